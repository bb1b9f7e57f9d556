"""Quantization schemes, one unit per profile config type (edgelm/config/profile.py `Quantization`).
Stages, the hardware preflight and the summaries look the scheme up here and ask it; nothing else
tests the mode. A new scheme is one module in this package and one line in SCHEMES."""

from __future__ import annotations

from typing import Any

from edgelm.config.profile import Float16, NoQuantization, StaticQDQ, WeightOnly
from edgelm.errors import ConfigError
from edgelm.quant import float16, none, static_qdq, weight_only
from edgelm.quant.base import PREP_PASSES, Scheme

SCHEMES: dict[type, Scheme] = {NoQuantization: none.SCHEME, StaticQDQ: static_qdq.SCHEME,
                               WeightOnly: weight_only.SCHEME, Float16: float16.SCHEME}

__all__ = ["PREP_PASSES", "SCHEMES", "Scheme", "scheme_for", "scheme_for_mode"]


def scheme_for(settings: Any) -> Scheme:
    """The scheme of a profile's `quantization` settings, by their exact config type."""
    scheme = SCHEMES.get(type(settings))
    if scheme is None:
        known = ", ".join(cls.__name__ for cls in SCHEMES)
        raise ConfigError(f"quantization: no scheme is registered for {type(settings).__name__} "
                          f"(mode {getattr(settings, 'mode', '?')!r}); registered: {known}",
                          hint="add its module to edgelm/quant/ and its line to SCHEMES in edgelm/quant/__init__.py "
                               "(docs/extending.md, Add a quantization scheme)")
    return scheme


def scheme_for_mode(mode: str) -> Scheme:
    """The scheme whose facts carry `mode` (a manifest's quantize facts: inspect, build summary)."""
    for scheme in SCHEMES.values():
        if scheme.mode == mode:
            return scheme
    raise ConfigError(f"quantization: no scheme is registered for mode {mode!r} "
                      f"(registered: {', '.join(s.mode for s in SCHEMES.values())})",
                      hint="this bundle was built by an edgelm with another scheme; inspect it with that version")
