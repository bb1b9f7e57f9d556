"""End to end on the real SmolLM2-135M-Instruct (GGUF) with a LoRA adapter made by peft: the CLI
build merges it into the de-quantized fp32 weights, verifies the merge, and the int8 bundle meets
the profile's gates against base + adapter (not against the bare base)."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow


def test_cli_build_with_adapter_on_the_real_model(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from edgelm.stages.load.model import load_pretrained

    torch.manual_seed(0)
    model = get_peft_model(load_pretrained("default").model,
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    with torch.no_grad():  # a modest delta, like a trained adapter's
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.02)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "smollm2-adapter-int8"
    result = subprocess.run(["edgelm", "build", "--profile", "cpu-int8", "--adapter", f"{tmp_path / 'adapter'}:0.8",
                             "-o", str(out)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "adapters" in result.stdout and "1 merged" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    adapter = manifest["adapters"][0]
    assert adapter["weight"] == 0.8 and adapter["variant"] == "lora" and adapter["tensors"] == 30 * 3 * 2
    assert adapter["merge_max_abs_diff"] < 1e-3 and adapter["logit_shift"] > 0.05  # exact merge, a real change
    assert manifest["plan"]["adapters"][0]["path"] == str((tmp_path / "adapter").resolve())
    quality = manifest["quality"]
    assert quality["perplexity_ratio"] <= 1.02 and quality["top1_agreement"] >= 0.95
