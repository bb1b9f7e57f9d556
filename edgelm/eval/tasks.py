"""Zero/few-shot accuracy: a labelled task's prompts in each prompt format, scored by every
scoring convention, raw and contextually calibrated.

An answer is chosen by the log-likelihood of its tokens after the prompt, never by parsing
generated text. The prompt formats (FORMATS):
- plain: the task's own question, the answer after a space (few-shot: solved examples before it);
- classify: the prompt `llm.classify(text, labels=options)` builds with its default template
  (for multiple choice the text is the question: Task.ask);
- chat: the question as a user turn of the bundle's chat template, the answer as the reply
  (few-shot: each example a user turn answered by an assistant turn)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMATS = ("plain", "classify", "chat")
# logprobs(prompt_ids, [continuation_ids, ...]) -> [per-token log-probabilities, ...]
Scorer = Callable[[list[int], list[list[int]]], list[np.ndarray]]
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    options: tuple[str, ...] = ()  # multiple choice: this question's own options (the label is one)


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]  # the answers of every example; () where each example has its own options
    query: str  # format string with {text}; the answer follows
    examples: tuple[Example, ...]
    pool: tuple[Example, ...]
    ask: str = "{text}"  # the text as a user hands it to classify() (multiple choice: the question)
    # few-shot selection: None = round-robin over the labels; else (text, shots) -> the pool examples
    # for that text (nearest by embedding: with_nearest_demos)
    select: Callable[[str, int], list[Example]] | None = None

    def options(self, example: Example) -> tuple[str, ...]:
        return example.options or self.labels

    def demos(self, shots: int, text: str | None = None) -> list[Example]:
        """`shots` pool examples for `text`: the task's selection, else round-robin over the labels
        (in pool order for multiple choice)."""
        if self.select is not None and text is not None and shots:
            return self.select(text, shots)
        if not self.labels:
            return [self.pool[i % len(self.pool)] for i in range(shots)]
        by_label = {label: [e for e in self.pool if e.label == label] for label in self.labels}
        chosen = []
        for i in range(shots):
            bucket = by_label[self.labels[i % len(self.labels)]]
            chosen.append(bucket[(i // len(self.labels)) % len(bucket)])
        return chosen

    def prompt(self, text: str, options: Sequence[str], shots: int, fmt: str = "plain",
               render_chat: Callable[[Messages], str] | None = None, content_free: bool = False,
               demos_for: str | None = None) -> tuple[str, str]:
        """(prompt, what goes before each answer) for `text` in the prompt format `fmt`.
        content_free: `text` is the whole input (classify: in place of the question, as
        classify(calibrate=True) puts it); demos_for: the text whose examples to show (the
        evaluated example's, when `text` is the content-free input)."""
        demos = self.demos(shots, demos_for or text)
        if fmt == "plain":
            solved = "".join(f"{self.query.format(text=e.text)} {e.label}\n\n" for e in demos)
            return solved + self.query.format(text=text), " "
        from edgelm_runtime.prompts import DEFAULT_CLASSIFY, template_from_dict

        if fmt == "classify":  # exactly what classify() builds
            asked = text if content_free else self.ask.format(text=text)
            solved = [(self.ask.format(text=e.text), e.label) for e in demos]
            return template_from_dict("classify", DEFAULT_CLASSIFY).classify_input(asked, list(options), solved,
                                                                                   render_chat=render_chat)
        messages: Messages = []
        for e in demos:
            messages += [{"role": "user", "content": self.query.format(text=e.text)},
                         {"role": "assistant", "content": e.label}]
        return _chat(render_chat, [*messages, {"role": "user", "content": self.query.format(text=text)}]), ""


def _chat(render_chat: Callable[[Messages], str] | None, messages: Messages) -> str:
    if render_chat is None:
        raise ValueError("a chat prompt needs the bundle's chat template (pass render_chat=llm.render_chat)")
    return render_chat(messages)


def task_accuracy(task: Task, shots: int, encode: Callable[[str], list[int]], scorers: Sequence[Scorer],
                  context: int, fmt: str = "plain", render_chat: Callable[[Messages], str] | None = None,
                  on_example: Callable[[int], None] = lambda i: None) -> list[dict[str, float]]:
    """Accuracy of each scorer on the task (the same prompts and tokens for all of them) in the
    prompt format `fmt`, under every scoring convention (edgelm_runtime.scoring.SCORINGS), each
    contextually calibrated ("<convention>+calibrated": each answer's score after the content-free
    input subtracted), and "default": the convention classify() applies when none is asked for
    (scoring.label_convention of the answers' token counts). A prompt longer than the context loses
    its oldest tokens."""
    from edgelm_runtime.prompt_tasks import CONTENT_FREE
    from edgelm_runtime.scoring import SCORINGS, aggregate, label_convention, split_continuations

    priors: dict[tuple[Any, ...], list[dict[str, np.ndarray]]] = {}

    def scores(text: str, options: tuple[str, ...], content_free: bool = False,
               demos_for: str | None = None) -> tuple[list[dict[str, np.ndarray]], str]:
        prompt, before = task.prompt(text, options, shots, fmt, render_chat, content_free, demos_for)
        answers = [before + option for option in options]
        prompt_ids, answer_ids = split_continuations(encode, prompt, answers)
        prompt_ids = prompt_ids[-(context - max(len(ids) for ids in answer_ids)):]
        scoring, calibrate = label_convention([len(ids) for ids in answer_ids])
        return ([{scoring: np.asarray([aggregate(lp, answer, scoring) for lp, answer in zip(logprobs, answers)])
                  for scoring in SCORINGS} for logprobs in (scorer(prompt_ids, answer_ids) for scorer in scorers)],
                scoring + ("+calibrated" if calibrate else ""))

    correct = [dict.fromkeys(["default", *SCORINGS, *(f"{s}+calibrated" for s in SCORINGS)], 0) for _ in scorers]
    for i, example in enumerate(task.examples):
        options = task.options(example)
        # the prior of the prompt the example is asked in: its own examples when they are chosen per text
        key = (options, tuple(task.demos(shots, example.text))) if task.select is not None else (options,)
        if key not in priors:
            priors[key] = scores(CONTENT_FREE, options, content_free=True, demos_for=example.text)[0]
        gold = options.index(example.label)
        found, default = scores(example.text, options)
        for tally, by_scoring, prior in zip(correct, found, priors[key]):
            right = {}
            for scoring, values in by_scoring.items():
                right[scoring] = int(np.argmax(values)) == gold
                right[f"{scoring}+calibrated"] = int(np.argmax(values - prior[scoring])) == gold
            for name, hit in {**right, "default": right[default]}.items():
                tally[name] += hit
        on_example(i + 1)
    return [{name: count / len(task.examples) for name, count in tally.items()} for tally in correct]


def with_nearest_demos(task: Task, embedder: Any) -> Task:
    """`task` with its few-shot examples chosen per text: the pool's nearest by the embedder's
    cosine similarity (edgelm_runtime.NearestExamples), the most similar last."""
    from edgelm_runtime.examples import NearestExamples

    picker = NearestExamples(embedder, [(task.ask.format(text=e.text), str(i)) for i, e in enumerate(task.pool)])
    cache: dict[tuple[str, int], list[Example]] = {}

    def select(text: str, shots: int) -> list[Example]:
        if (text, shots) not in cache:
            cache[text, shots] = [task.pool[int(i)] for _, i in picker.select(task.ask.format(text=text), shots)]
        return cache[text, shots]

    return dataclasses.replace(task, select=select)
