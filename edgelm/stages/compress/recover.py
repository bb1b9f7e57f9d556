"""Recover a pruned model by distillation from the unpruned one (the teacher).

The training text is the calibration text, each sample continued by the teacher itself (sampled,
seeded) to `seq_len` tokens, so the student learns the teacher's own distribution and nothing is
downloaded. The teacher's top-k next-token probabilities are computed once per sequence; each
step the student (LoRA on every projection, or all weights) minimises the KL divergence to them
over those k tokens, in bfloat16 autocast (1.5x faster than fp32 on this CPU, measured). LoRA
deltas are merged at the end, so the model exports as before."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from edgelm.config.recipe import RecoverySettings
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.calibration import calibration_texts

logger = logging.getLogger(__name__)


def training_sequences(teacher: Any, tokenizer: Any, chat_template: str | None, source: str,
                       settings: RecoverySettings, progress: Progress, stage: str) -> Any:
    """(samples, seq_len) token ids: calibration texts, each cut or continued by the teacher."""
    import torch

    texts = calibration_texts(source, tokenizer, chat_template, settings.samples)
    prompts = [ids[: settings.seq_len] for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts) if ids]
    generator = torch.Generator().manual_seed(settings.seed)
    rows = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), 16):
        batch = prompts[start:start + 16]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        new = settings.seq_len - min(len(p) for p in batch)
        if new > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            with torch.no_grad():
                ids = teacher.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=settings.temperature, top_p=1.0,
                                       max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
        for row, prompt in zip(ids, batch):
            rows.append(row[width - len(prompt):][: settings.seq_len])
        progress(stage, len(rows), len(prompts), f"recovery text {len(rows)}/{len(prompts)} (teacher continues it)")
    return torch.stack(rows)


def teacher_targets(teacher: Any, sequences: Any, top_k: int) -> tuple[Any, Any]:
    """The teacher's top-k next-token probabilities (renormalised over those k) and their ids."""
    import torch

    probs, indices = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(sequences), 8):
            logits = teacher(sequences[start:start + 8], use_cache=False).logits.float()
            values, ids = logits.log_softmax(-1).topk(top_k, dim=-1)
            probs.append(values.softmax(-1).half())
            indices.append(ids.int())
    return torch.cat(probs), torch.cat(indices)


def distill(student: Any, teacher: Any, state: BuildState, settings: RecoverySettings, progress: Progress,
            stage: str = "prune") -> dict[str, Any]:
    """Train `student` in place towards `teacher`; returns the facts (losses, seconds)."""
    import torch

    started = time.perf_counter()
    sequences = training_sequences(teacher, state.tokenizer, state.chat_template, state.plan.calibration.source,
                                   settings, progress, stage)
    target_probs, target_ids = teacher_targets(teacher, sequences, settings.top_k)
    model = student
    for parameter in student.parameters():
        parameter.requires_grad_(settings.method == "full")
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model

        from edgelm.arch import for_model

        # every projection of every layer, by the family's own leaf names (packed ones included)
        model = get_peft_model(student, LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                                                   target_modules=list(for_model(student).linear_names())))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) *
                                                 (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / settings.steps))))
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    model.train()
    for step in range(settings.steps):
        batch = torch.randint(0, len(sequences), (settings.batch_size,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=sequences[batch], use_cache=False).logits
        log_probs = logits.float().log_softmax(-1).gather(-1, target_ids[batch].long())
        probs = target_probs[batch].float()
        loss = (probs * (probs.clamp(min=1e-12).log() - log_probs)).sum(-1).mean()  # KL(teacher || student) on top-k
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        progress(stage, step + 1, settings.steps, f"recovery step {step + 1}/{settings.steps}, KL {losses[-1]:.3f}")
    model.eval()
    if settings.method == "lora":
        model.merge_and_unload()
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    window = max(1, settings.steps // 10)
    return {"method": settings.method, "steps": settings.steps, "sequences": len(sequences), "seq_len": settings.seq_len,
            "batch_size": settings.batch_size, "learning_rate": settings.learning_rate,
            "kl_first": round(sum(losses[:window]) / window, 4), "kl_last": round(sum(losses[-window:]) / window, 4),
            "seconds": round(time.perf_counter() - started, 1)}
