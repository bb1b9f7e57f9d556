"""The prompt-template tasks of a LanguageModel: complete a generate template, score continuations,
classify zero/few-shot. A mixin, so model.py keeps generation and these stay in one place; it uses
only LanguageModel's public generation pieces (_stream_text, continuation_logprobs, render_chat)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgelm_runtime.errors import GenerationError, TemplateError
from edgelm_runtime.prompts import DEFAULT_CLASSIFY, Classification, PromptTemplate, template_from_dict
from edgelm_runtime.sampling import SamplingParams
from edgelm_runtime.scoring import DEFAULT_SCORING, aggregate, check_scoring, label_convention, split_continuations

CONTENT_FREE = "N/A"  # the content-free input of contextual calibration (Zhao et al., 2021)


class PromptTasks:
    """complete(), score() and classify() on top of a LanguageModel's generation and scoring."""

    _prompts: dict[str, PromptTemplate]
    _path: Any
    _tokenizer: Any

    @property
    def templates(self) -> dict[str, PromptTemplate]:
        """The bundle's prompt templates by name (zero/few-shot classification and free prompts)."""
        return dict(self._prompts)

    def template(self, name: str) -> PromptTemplate:
        if name not in self._prompts:
            raise TemplateError(f"no prompt template {name!r} in {self._path.name}",
                                hint=f"templates here: {', '.join(sorted(self._prompts)) or 'none'}")
        return self._prompts[name]

    def render(self, name: str, **variables: Any) -> str:
        """A generate template's prompt with its variables filled (missing/unknown ones raise)."""
        return self.template(name).render(**variables)

    def complete(self, name: str, /, max_new_tokens: int | None = None, sampling: SamplingParams | None = None,
                 **variables: Any) -> str:
        """Render a generate template and continue it; stops at the template's stop strings.
        (`max_new_tokens` and `sampling` are reserved: templates cannot use them as variables.)"""
        template = self.template(name)
        prompt = template.render(**variables)
        schema = template.output_schema(**variables)  # a template that declares JSON output gets it, constrained
        matcher = None if schema is None else self.constraint(json_schema=schema)
        params = sampling or self.sampling_params()
        ids = self._tokenizer.encode(prompt, add_special_tokens=True)
        limit = max_new_tokens or template.max_new_tokens
        stop = None if matcher else list(template.stop) or None  # the grammar ends it, not a stop string
        return "".join(self._stream_text(ids, limit, params, stop, matcher))

    def score(self, prompt: str, continuations: Sequence[str], scoring: str = DEFAULT_SCORING,
              adapter: str | None = None) -> list[float]:
        """The score of each continuation after `prompt` (the prompt runs once): its tokens'
        log-probabilities aggregated by `scoring` (edgelm_runtime.scoring.SCORINGS: "sum", "per_token"
        (the mean, the default), "per_char", "per_byte").

        The prompt and continuations are split into tokens as lm-eval splits them
        (scoring.split_continuations), so a merge across the boundary is scored as the model sees it."""
        check_scoring(scoring)
        logprobs = self._view(adapter)._logprobs(prompt, continuations, special_tokens=True)
        return [aggregate(lp, text, scoring) for lp, text in zip(logprobs, continuations)]

    def _logprobs(self, prompt: str, continuations: Sequence[str], special_tokens: bool) -> list[np.ndarray]:
        context, tokens = split_continuations(lambda text: self._tokenizer.encode(text, special_tokens), prompt,
                                              continuations)
        return self.continuation_logprobs(context, tokens)

    def classify(self, text: str, labels: Sequence[str] | None = None,
                 examples: Sequence[tuple[str, str]] | None = None, template: str | None = None,
                 shots: int | None = None, scoring: str | None = None, calibrate: bool | None = None,
                 adapter: str | None = None) -> Classification:
        """The label whose tokens score best after the prompt (`scoring`, as in score()).

        `template` names a classify template of the bundle (its labels, few-shot pool, scoring,
        format and calibration are the defaults); `examples` are the caller's own few-shot (text, label) pairs;
        `shots` takes k of the template's pool, round-robin over the labels. A template with
        `chat: true` asks in a user turn of the chat template and scores the label as the reply.
        calibrate=True is contextual calibration ("calibrate before use"): each label's score after
        a content-free input ("N/A") is subtracted, which divides out the prompt's own prior for it.
        Where neither the call nor the template chooses, scoring.label_convention does: labels of one
        token each "per_token" uncalibrated, labels of several tokens "sum" calibrated.
        `adapter`: a runtime LoRA adapter's name for this call (as with_adapter)."""
        model = self._view(adapter)
        chosen = self.template(template) if template else template_from_dict("classify", DEFAULT_CLASSIFY)
        if chosen.kind != "classify":
            raise TemplateError(f"template {template!r} is a generate template", hint=f"use llm.complete({template!r}, ...)")
        if scoring is not None or chosen.scoring is not None:
            scoring = check_scoring(scoring or chosen.scoring)
        labels = list(labels or chosen.labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise GenerationError(f"labels {labels!r}: need two or more distinct labels",
                                  hint='pass labels=["positive", "negative"] or a template that has them')

        def scored(query: str) -> list[tuple[np.ndarray, str]]:
            """Each label's token log-probabilities after the prompt for `query`, and its text as scored."""
            prompt, before = chosen.classify_input(query, labels, examples, shots, self.render_chat)
            answers = [before + label for label in labels]
            # a chat template writes the special tokens (bos, role markers) itself
            return list(zip(model._logprobs(prompt, answers, special_tokens=not chosen.chat), answers))

        found = scored(text)
        auto_scoring, auto_calibrate = label_convention([len(lp) for lp, _ in found])
        scoring = scoring or auto_scoring
        calibrate = next(c for c in (calibrate, chosen.calibrate, auto_calibrate) if c is not None)
        values = {label: aggregate(lp, answer, scoring) for label, (lp, answer) in zip(labels, found)}
        if calibrate:
            values = {label: values[label] - aggregate(lp, answer, scoring)
                      for label, (lp, answer) in zip(labels, scored(CONTENT_FREE))}
        return Classification(label=max(labels, key=values.__getitem__), scores=values, scoring=scoring,
                              calibrated=calibrate)

