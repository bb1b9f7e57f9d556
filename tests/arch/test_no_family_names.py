"""No compiler module outside edgelm/arch/ names a family's module paths (comments included): every
stage asks the arch interface, so a new family is one module in edgelm/arch/.

`lm_head` alone is allowed: it is also a profile field name (`quantization.lm_head`) and a
user-facing module path substring (keep_int8: [lm_head]); attribute access on it (`lm_head.`)
is not, as that reaches into a family's module tree."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "edgelm"
NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
         "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "self_attn", "embed_tokens",
         "rotary_emb", "model.layers", "lm_head.")
# qkv_proj / gate_up_proj contain q... / up_proj only as substrings of longer names: one pattern finds both
PATTERN = re.compile("|".join(re.escape(name) for name in sorted(NAMES, key=len, reverse=True)))
ALLOWED = {"arch", "runtime"}  # the family modules themselves; runtime/ is the separate runtime package


def offending_lines() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ALLOWED:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in PATTERN.finditer(line):
                found.append(f"edgelm/{relative}:{number}: {match.group(0)}: {line.strip()[:100]}")
    return found


def test_no_family_module_names_outside_arch():
    found = offending_lines()
    assert not found, f"{len(found)} family module names outside edgelm/arch/:\n" + "\n".join(found)
