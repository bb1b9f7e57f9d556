"""Build random-initialised models from the published configs of the families people ship, and
report what each build records: the bundle's size split (embedding / layers / head), the export
route, parity and build time. Random weights measure size and speed honestly, not quality.

    python benchmarks/family_sizes.py --layers 4 --profiles cpu-int8 cpu-int4 -o work/family-sizes

--layers keeps the first N layers of the real depth (the vocabulary and widths are the real ones),
so a 262k-vocabulary Gemma 3 builds in minutes on a 2-core machine; the per-layer size is exact,
multiply by the real depth for the whole model. The tokenizer is SmolLM2's (from the default
model), padded to the config's vocabulary: token ids beyond it are never produced by it, which
does not change any size or any graph."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

# The published configs (config.json of each model on the Hugging Face hub), the fields that
# decide shapes and graph features. Widths and vocabularies are the real ones.
CONFIGS = {
    "gemma-3-1b": ("gemma3_text", 26, {
        "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512, "query_pre_attn_scalar": 256,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}),
    "qwen3-0.6b": ("qwen3", 28, {
        "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "llama-3.2-1b": ("llama", 16, {
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}}),
}


def save_model(name: str, layers: int, folder: Path) -> tuple[int, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgelm.stages.load.model import load_pretrained

    model_type, depth, fields = CONFIGS[name]
    tokenizer = load_pretrained("default").tokenizer
    layer_types = None
    if model_type == "gemma3_text":  # five sliding layers, then a global one
        layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **fields,
                                  **({"layer_types": layer_types} if layer_types else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return depth, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--profiles", nargs="+", default=["cpu-int8", "cpu-int4"])
    parser.add_argument("-o", "--output", type=Path, default=Path("work/family-sizes"))
    args = parser.parse_args()

    from edgelm import api

    recipe = args.output / "recipe.yaml"
    args.output.mkdir(parents=True, exist_ok=True)
    # random weights: the quality gates are meaningless, so they are opened wide; the build still measures them
    recipe.write_text("max_seq_len: 512\ncalibration: {samples: 8, max_prompt_tokens: 64}\n"
                      "quality: {windows: 2, window_len: 128, max_perplexity_ratio: 1000.0, min_top1_agreement: 0.0}\n")
    from edgelm_runtime.hardware import host_features

    host = host_features()
    print(f"host: {host['cpu']} ({host['machine']}, {', '.join(host['isa'])}), {platform.platform()}")
    rows = []
    for name in args.models:
        folder = args.output / "models" / name
        depth, params = save_model(name, args.layers, folder)
        for profile in args.profiles:
            out = args.output / "bundles" / f"{name}-{profile}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            report = api.build(api.plan_build(profile=profile, recipe=recipe, model=str(folder), name=out.name), out)
            split = report.facts["package"]["size_split"]
            rows.append({"model": name, "layers": f"{args.layers} of {depth}", "params_m": round(params / 1e6, 1),
                         "profile": profile, "route": report.facts["export"]["graph"],
                         "parity": report.facts["export"]["parity"]["max_abs_diff_with_past"],
                         **split, "build_s": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]))
    (args.output / "family_sizes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
