"""Fitting a conversation into the context: the oldest turns go first."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edgelm_runtime.errors import EdgelmRuntimeError, GenerationError

Messages = list[dict[str, Any]]


class PromptDeadlineError(GenerationError):
    """Trimming a conversation ran past the caller's deadline (`chat_prompt_ids(deadline=...)`)."""


def fit_messages(chat_ids: Callable[[Messages], list[int]], messages: Messages, max_seq_len: int, room: int,
                 deadline: float | None = None) -> tuple[Messages, list[int]]:
    """(kept messages, their prompt ids by `chat_ids`), leaving `room` tokens of `max_seq_len`
    for the answer. The rule: drop the oldest turn, then any turns up to the next user turn, until
    the prompt fits (a leading system message always stays).

    Its candidates are the suffixes starting at turn 0, at each later user turn and at the last
    turn; the kept one is the first that fits (or that the template refuses: its error is raised).
    A shorter suffix never renders longer, so instead of rendering every candidate in turn
    (quadratic: 3,000 messages took 46 s) this gallops back from the last one and then bisects: at
    most 2 log2(candidates) + 3 renders, the same messages kept."""
    whole = chat_ids(messages)  # first: malformed messages get the template's own errors
    budget = max_seq_len - room
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    turns = list(messages[len(system):])
    if not turns:
        raise GenerationError("the conversation has no user message", hint='pass [{"role": "user", "content": "..."}]')
    if len(whole) <= budget:
        return list(messages), whole
    starts = [0, *(i for i in range(1, len(turns) - 1) if turns[i].get("role") == "user"), len(turns) - 1]
    tried: dict[int, list[int] | EdgelmRuntimeError] = {}

    def stops_here(k: int) -> bool:
        """Whether the one-turn-at-a-time rule would stop at candidate k (fits, or fails)."""
        if deadline is not None and time.monotonic() > deadline:
            raise PromptDeadlineError("trimming the conversation ran past its deadline",
                                      hint="send a shorter conversation")
        try:
            tried[k] = chat_ids(system + turns[starts[k]:])
        except EdgelmRuntimeError as exc:
            tried[k] = exc
            return True
        return len(tried[k]) <= budget

    lo, hi = 0, len(starts) - 1  # candidate 0 (everything) does not fit
    if len(turns) > 1 and stops_here(hi):
        step = 1
        while hi - step > lo and stops_here(hi - step):  # gallop: the kept part is usually short
            hi, step = hi - step, step * 2
        lo = max(lo, hi - step)
        while hi - lo > 1:
            middle = (lo + hi) // 2
            lo, hi = (lo, middle) if stops_here(middle) else (middle, hi)
        kept = tried[hi]
        if isinstance(kept, EdgelmRuntimeError):
            raise kept
        return system + turns[starts[hi]:], kept
    raise GenerationError(f"the last message does not fit the context ({max_seq_len} tokens "
                          f"with {room} kept for the answer)",
                          hint="shorten the message or the system prompt, or ask for fewer new tokens")
