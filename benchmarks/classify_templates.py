"""Which default template should `llm.classify(text, labels=...)` use? Candidates side by side.

    python benchmarks/classify_templates.py dist/smollm2-fp32 --samples 60 --shots 0 [--json out.json]

Each candidate is a classify template (edgelm_runtime.prompts; --bundle-templates adds the
bundle's own, as shipped) put in place of DEFAULT_CLASSIFY
and run on the suite's tasks (edgelm/eval/task_data.py) in the eval's "classify" format, which
builds exactly the prompt classify() builds: the text as a user would pass it (for multiple choice
the bare question), the labels or options, no task-specific wording. Every scoring convention is
reported, raw and contextually calibrated; the same bundle, tokens and examples for every row.
The result chose DEFAULT_CLASSIFY (docs/zero-shot.md)."""

from __future__ import annotations

import argparse
import json
import platform
import sys

CANDIDATES = {
    "label": {"instruction": "Classify the text as one of: {labels}.", "query": "Text: {text}\nLabel:"},
    "label-answer": {"instruction": "Classify the text as one of: {labels}.", "query": "Text: {text}\nAnswer:"},
    "label-bare": {"query": "Text: {text}\nLabel:"},
    "answer": {"instruction": "Answer with one of: {labels}.", "query": "{text}\nAnswer:"},
    "bare": {"query": "{text}\nAnswer:"},
    "chat": {"instruction": "Answer with one of: {labels}.", "query": "{text}", "chat": True},
    "chat-bare": {"query": "{text}", "chat": True},
    "question": {"query": "Question: {text}\nAnswer:"},
    "question-chat": {"query": "Question: {text}\nAnswer:", "chat": True},
}


def _classify_accuracy(llm, task, shots: int, template: str) -> float:
    solved = [(task.ask.format(text=e.text), e.label) for e in task.demos(shots)]
    picks = [llm.classify(task.ask.format(text=e.text), labels=list(task.options(e)), examples=solved,
                          template=template).label == e.label for e in task.examples]
    return sum(picks) / len(picks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--tasks", default="sentiment,topic,capitals,yesno")
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--bundle-templates", default="", help="also the bundle's own classify templates, e.g. multiple-choice")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)

    import edgelm_runtime
    from edgelm.eval.task_data import load_task
    from edgelm.eval.tasks import task_accuracy
    from edgelm_runtime import prompts
    from edgelm_runtime.hardware import describe_host

    llm = edgelm_runtime.load_bundle(args.bundle)
    encode = lambda text: llm.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    tasks = [load_task(name, args.samples, args.seed) for name in args.tasks.split(",")]
    candidates = {name: {"kind": "classify", **CANDIDATES[name]} for name in args.candidates.split(",") if name}
    for name in filter(None, args.bundle_templates.split(",")):  # as shipped: its query, format and scoring
        candidates[f"bundle:{name}"] = prompts.template_to_dict(llm.template(name))
    rows = []
    for name, template in candidates.items():
        prompts.DEFAULT_CLASSIFY = template
        for task in tasks:
            accuracy = task_accuracy(task, args.shots, encode, [llm.continuation_logprobs], llm.manifest.max_seq_len,
                                     "classify", llm.render_chat)[0]
            if name.startswith("bundle:"):  # and through classify() itself, with the template's own defaults
                accuracy["classify()"] = _classify_accuracy(llm, task, args.shots, name.removeprefix("bundle:"))
            rows.append({"template": name, "task": task.name, "n": len(task.examples), **accuracy})
            print(f"{name:10s} {task.name:10s} " + " ".join(f"{k}={v:.2f}" for k, v in accuracy.items()),
                  file=sys.stderr, flush=True)
    report = {"bundle": llm.manifest.name, "host": describe_host(), "python": platform.python_version(),
              "shots": args.shots, "samples": args.samples, "seed": args.seed, "rows": rows}
    text = json.dumps(report, indent=2)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
