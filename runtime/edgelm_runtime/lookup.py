"""Prompt-lookup drafts for speculative greedy decoding: when the last few tokens appeared before
(in the prompt or the output so far), the tokens that followed them then are a good guess of what
follows now. Extraction, summaries, code edits and quoted answers copy their input, so a draft of
several tokens is often right and one multi-token model run verifies it (generate.decode_tokens).

Hand-written: it is a dictionary of n-grams (as in transformers' prompt_lookup_num_tokens and
llama.cpp's lookup decoding), and the runtime takes no dependency for it."""

from __future__ import annotations

from collections.abc import Sequence

MAX_NGRAM = 3   # the longest suffix matched; longer matches are rarer and no more often right
MIN_NGRAM = 2   # a single repeated token predicts the next one too rarely to pay for a verification


class PromptLookup:
    """The sequence so far, indexed by its n-grams (n = MIN_NGRAM..MAX_NGRAM): each n-gram's first
    and latest start, so a lookup is a dictionary read per n, not a scan of the sequence. The
    latest is usually the better guess; the first, when the latest sits just before the end (a
    repeating run) and has almost no follower."""

    def __init__(self, ids: Sequence[int], max_draft: int) -> None:
        self.max_draft = max_draft
        self._ids: list[int] = []
        self._last: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._draft_len = max_draft
        for token in ids:
            self.push(token)

    def push(self, token: int) -> None:
        """Append a token of the sequence (accepted, so part of the text from now on)."""
        ids = self._ids
        # index the n-grams that end just before the new token: their follower is now known
        for n in range(MIN_NGRAM, MAX_NGRAM + 1):
            if len(ids) >= n:
                key = tuple(ids[-n:])
                self._last[key] = (self._last.get(key, (len(ids) - n,))[0], len(ids) - n)
        ids.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to min(limit, the current draft length) tokens that followed the longest earlier
        occurrence of the sequence's last n tokens; [] when nothing matches."""
        ids, limit = self._ids, min(limit, self._draft_len)
        if limit < 1:
            return []
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(ids) <= n:
                continue
            starts = self._last.get(tuple(ids[-n:]))
            if starts:  # the n-gram at `start` is followed by ids[start + n:]; the longer follower wins
                best = max(starts, key=lambda start: (min(len(ids) - start - n, limit), start))
                return ids[best + n:best + n + limit]
        return []

    def accepted(self, drafted: int, kept: int) -> None:
        """After a verification: a draft that was fully right may grow, a wrong one shrinks (a
        wasted position still costs compute, which is what keeps free chat from slowing down)."""
        if kept == drafted:
            self._draft_len = min(self.max_draft, self._draft_len * 2)
        else:
            self._draft_len = max(1, kept + 1)
