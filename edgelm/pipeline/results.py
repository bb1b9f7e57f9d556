"""What each stage of a build did, as typed results.

A stage returns one of these. `record()` is what the manifest keeps under
`provenance.stages.<name>` (fields left None are not recorded, so a record names only what
happened), and `note()` words it for the build summary and `edgelm inspect`, which reads it
back with `from_record`. Fields marked `_ARTEFACT` carry data to later stages (activation
ranges, sensitivity scores, the manifest being assembled) and are never recorded: a later stage
reads them as `state.result(SmoothResult).activation_ranges`, not as a loose attribute of the state.

This module imports nothing heavy: `edgelm inspect` uses it without torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

_ARTEFACT = {"artefact": True}  # field metadata: passed on to later stages, not recorded


@dataclass(frozen=True)
class StageResult:
    stage: ClassVar[str] = ""
    skipped: str | None = None   # why the stage had nothing to do in this build

    def record(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("artefact") and getattr(self, f.name) is not None}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> StageResult:
        """A result read back from a manifest record (unknown keys, e.g. `seconds`, are left out)."""
        names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("artefact")}
        return cls(**{key: value for key, value in data.items() if key in names})

    @property
    def shown(self) -> bool:
        """Whether the build summary gives this stage a row (skipped stages are in the manifest only)."""
        return self.skipped is None

    def note(self) -> str:
        return self.skipped or ""


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class PreflightResult(StageResult):
    stage: ClassVar[str] = "preflight"
    family: str | None = None
    context: int | None = None       # the context the build will use
    adapters: int = 0
    calibration: str = "builtin"

    def note(self) -> str:
        adapters = f"{self.adapters} adapter{'s' if self.adapters > 1 else ''}" if self.adapters else "no adapters"
        calibration = "builtin calibration" if self.calibration == "builtin" else f"calibration {self.calibration}"
        return f"{self.family}, context {self.context}, {adapters}, {calibration}: inputs checked"


@dataclass(frozen=True)
class LoadResult(StageResult):
    stage: ClassVar[str] = "load"
    model: str = ""
    format: str = ""
    model_type: str = ""
    family: str = ""
    parameters: int = 0
    layers: int = 0
    max_seq_len: int = 0

    def note(self) -> str:
        return f"{self.model} ({self.format}, {self.parameters / 1e6:.1f}M params)"


@dataclass(frozen=True)
class AdaptersResult(StageResult):
    stage: ClassVar[str] = "adapters"
    adapters: int = 0
    merge_max_abs_diff: float | None = None
    logit_shift: float | None = None
    warnings: list[str] | None = None
    runtime: list[dict[str, Any]] | None = None     # adapters kept for run time (stages/runtime_adapters.py)
    transforms_off: list[str] | None = None          # prep passes a runtime-adapter build turned off
    merged: list[dict[str, Any]] = field(default_factory=list, metadata=_ARTEFACT)  # the manifest's `adapters`
    kept: tuple[Any, ...] = field(default=(), metadata=_ARTEFACT)  # RuntimeAdapter objects, for export and packaging

    @property
    def shown(self) -> bool:
        return self.adapters > 0 or bool(self.runtime)

    def note(self) -> str:
        notes = []
        if self.adapters:
            notes.append(f"{self.adapters} merged, logits vs unmerged max diff {self.merge_max_abs_diff:.1e}, "
                         f"shift vs base {self.logit_shift:.3g}")
        if self.runtime:
            off = f" ({', '.join(self.transforms_off)} off: adapters would need them too)" if self.transforms_off else ""
            notes.append(f"{len(self.runtime)} kept for run time: {', '.join(r['name'] for r in self.runtime)}{off}")
        return "; ".join(notes or ["none"]) + "".join(f"; [yellow]warning: {w}[/]" for w in self.warnings or [])


@dataclass(frozen=True)
class PruneResult(StageResult):
    stage: ClassVar[str] = "prune"
    kind: str | None = None
    importance: str | None = None
    kv_heads: int | None = None
    mlp_channels: list[int] | None = None
    allocation: str | None = None
    compensated: bool | None = None
    dropped_layers: list[int] | None = None
    zeroed_fraction: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    nonzero_params_after: int | None = None
    layers: int | None = None
    perplexity_before: float | None = None
    perplexity_pruned: float | None = None
    recovery: dict[str, Any] | None = None
    perplexity_ratio_vs_unpruned: float | None = None

    def note(self) -> str:
        if self.skipped:
            return self.skipped
        what = []
        if self.mlp_channels:
            sizes = sorted(set(self.mlp_channels))
            what.append(f"MLP channels {sizes[0]}" + (f"-{sizes[-1]}" if len(sizes) > 1 else "") + " per layer")
        if self.kv_heads is not None:
            what.append(f"{self.kv_heads} KV heads")
        if self.dropped_layers:
            what.append(f"layers {', '.join(map(str, self.dropped_layers))} dropped")
        if self.zeroed_fraction is not None:
            what.append(f"{self.zeroed_fraction:.0%} of layer weights zero")
        note = (f"{self.kind} ({self.importance}): {self.params_before / 1e6:.4g}M -> "
                f"{self.params_after / 1e6:.4g}M params, {'; '.join(what) or 'nothing removed'}; "
                f"ppl {self.perplexity_before:.2f} -> {self.perplexity_pruned:.2f}")
        if self.recovery:
            r = self.recovery
            note += f" -> {r['perplexity_after']:.2f} after {r['steps']} {r['method']} distillation steps ({r['seconds']:.0f} s)"
        return note


@dataclass(frozen=True)
class RotateResult(StageResult):
    stage: ClassVar[str] = "rotate"
    hidden_rotation: str | None = None
    head_rotation: str | None = None
    online_rotation: str | None = None
    untied_head: bool | None = None
    layers: int | None = None
    parity: float | None = None   # max |logit change| / max |logit| on calibration prompts

    def note(self) -> str:
        if self.skipped:
            return self.skipped
        return (f"{self.hidden_rotation} (residual), {self.head_rotation} (values), {self.online_rotation} online "
                f"(down inputs) in {self.layers} layers; logits moved {self.parity:.2g}")


@dataclass(frozen=True)
class SmoothResult(StageResult):
    stage: ClassVar[str] = "smooth"
    max_outlier_ratio_before: float | None = None
    alpha: float | None = None
    smoothed_linears: int | None = None
    max_outlier_ratio_after: float | None = None
    unsmoothed_inputs: list[str] | None = None
    worst_inputs: dict[str, float] | None = None
    # module path -> input outlier ratio (ranks MatMuls for mixed precision) and input (min, max) (sensitivity)
    outlier_ratios: dict[str, float] = field(default_factory=dict, metadata=_ARTEFACT)
    activation_ranges: dict[str, tuple[float, float]] = field(default_factory=dict, metadata=_ARTEFACT)

    def note(self) -> str:
        if self.skipped:
            return self.skipped
        ratio = f"max input outlier ratio {self.max_outlier_ratio_before}"
        if self.alpha is not None:
            return f"alpha {self.alpha}, {self.smoothed_linears} Linears, {ratio} -> {self.max_outlier_ratio_after}"
        return f"off; {ratio}"


@dataclass(frozen=True)
class AwqResult(StageResult):
    stage: ClassVar[str] = "awq"
    groups: int | None = None
    mean_alpha: float | None = None
    mean_relative_error_before: float | None = None
    mean_relative_error_after: float | None = None
    unscaled_inputs: list[str] | None = None   # inputs whose readers have no foldable producer

    def note(self) -> str:
        if self.skipped:
            return self.skipped
        if not self.groups:
            return f"no input could be scaled ({', '.join(self.unscaled_inputs or [])})"
        note = (f"{self.groups} inputs, mean alpha {self.mean_alpha}, 4-bit output error "
                f"{self.mean_relative_error_before:.3g} -> {self.mean_relative_error_after:.3g}")
        return note + (f"; {len(self.unscaled_inputs)} left unscaled" if self.unscaled_inputs else "")


@dataclass(frozen=True)
class SensitivityResult(StageResult):
    stage: ClassVar[str] = "sensitivity"
    groups: int | None = None
    probe_tokens: int | None = None
    most_sensitive: dict[str, float] | None = None
    by_module: dict[str, float] = field(default_factory=dict, metadata=_ARTEFACT)  # module path -> its group's KL

    def note(self) -> str:
        if self.skipped:
            return self.skipped
        worst = ", ".join(list(self.most_sensitive or {})[:3])
        return f"{self.groups} groups on {self.probe_tokens} tokens; most sensitive: {worst}"


@dataclass(frozen=True)
class ExportResult(StageResult):
    stage: ClassVar[str] = "export"
    exporter: str = ""
    graph: str = ""
    opset: int = 0
    size_mb: float = 0.0
    parity: dict[str, float] = field(default_factory=dict)
    fused_refused: str | None = None
    role: str | None = None   # "reference": the quality check's fp32 graph (the bundle ships static graphs)

    def note(self) -> str:
        p = self.parity
        graph = "fused (packed QKV, GroupQueryAttention, packed gate/up)" if self.graph == "fused" else "generic"
        if self.fused_refused:
            graph += f" ({self.fused_refused})"
        role = "fp32 reference: " if self.role == "reference" else ""
        return f"{role}{graph}, {self.size_mb} MB, parity {max(p['max_abs_diff_no_past'], p['max_abs_diff_with_past']):.1e}"


@dataclass(frozen=True)
class StaticResult(StageResult):
    stage: ClassVar[str] = "static"
    prefill_len: int | None = None
    kv_window: int | None = None
    projections: str | None = None
    parity: dict[str, float] | None = None
    ops: list[str] | None = None

    def note(self) -> str:
        if self.skipped:
            return self.skipped
        return (f"prefill {self.prefill_len} tokens + decode 1, KV window {self.kv_window}, "
                f"{self.projections} projections, parity {self.parity['max_abs_diff']:.1e}")


@dataclass(frozen=True)
class FuseResult(StageResult):
    stage: ClassVar[str] = "fuse"
    fused: dict[str, int] = field(default_factory=dict)   # fused op -> count (the manifest's `fusions`)
    max_abs_diff_vs_export: float | None = None

    @property
    def shown(self) -> bool:
        return True  # "fusions disabled by the profile" is worth a row

    def note(self) -> str:
        return ", ".join(f"{op} x{n}" for op, n in self.fused.items()) or self.skipped or ""


@dataclass(frozen=True)
class QuantizeResult(StageResult):
    """The scheme's own facts (edgelm/quant/): each scheme records and words what it did."""

    stage: ClassVar[str] = "quantize"
    mode: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, **_plain(self.details)}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> QuantizeResult:
        return cls(mode=data["mode"], details={k: v for k, v in data.items() if k not in ("mode", "seconds")})

    def note(self) -> str:
        from edgelm.quant import scheme_for_mode

        return scheme_for_mode(self.mode).note(self.record())


@dataclass(frozen=True)
class DeviceResult(StageResult):
    stage: ClassVar[str] = "device"
    graphs: dict[str, dict[str, Any]] | None = None   # file -> {"ops": {op: count}, "static": bool}
    allowed_ops: int | None = None

    def note(self) -> str:
        if self.skipped:
            return self.skipped
        graphs = self.graphs or {}
        return (f"{', '.join(graphs)}: every op in allowed_ops ({self.allowed_ops} listed)"
                f"{', every dimension static' if all(g['static'] for g in graphs.values()) else ''}")


@dataclass(frozen=True)
class PackageResult(StageResult):
    stage: ClassVar[str] = "package"
    size_mb: float = 0.0
    files: list[str] = field(default_factory=list)
    size_split: dict[str, Any] | None = None
    compressed_mb: float | None = None   # zlib size, recorded for pruned builds (zeros compress)
    manifest: Any = field(default=None, metadata=_ARTEFACT)  # the bundle's Manifest, finished by the manifest stage

    def note(self) -> str:
        return f"{self.size_mb} MB" + (f" ({size_split_note(self.size_split)})" if self.size_split else "")


@dataclass(frozen=True)
class QualityResult(StageResult):
    stage: ClassVar[str] = "quality"
    perplexity: float = 0.0
    reference_perplexity: float = 0.0
    perplexity_ratio: float = 0.0
    top1_agreement: float = 0.0
    kl_divergence: float = 0.0
    tokens: int = 0
    provider: str = ""
    measured_on: str = ""
    eval_text: str = ""
    windows: int = 0
    window_len: int = 0
    windows_sha256: str = ""
    chat: dict[str, Any] = field(default_factory=dict)  # chat_fidelity's numbers ({} when switched off)

    def note(self) -> str:
        where = "" if (self.measured_on or self.provider) == self.provider else \
            f" (on {self.measured_on}: no {self.provider} here)"
        chat = (f", chat: {self.chat['identical']:.0%} of {self.chat['prompts']} answers identical, "
                f"prefix {self.chat['mean_prefix']:.0%}") if self.chat else ""
        return (f"ppl {self.perplexity:.2f} vs {self.reference_perplexity:.2f} "
                f"(x{self.perplexity_ratio:.3f}), top-1 {self.top1_agreement:.3f}{chat}{where}")


@dataclass(frozen=True)
class AdapterFilesResult(StageResult):
    """Runtime adapters written into the bundle, each with its parity and quality (stages/package_adapters.py)."""

    stage: ClassVar[str] = "adapter-files"
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> parity and quality numbers
    entries: tuple[Any, ...] = field(default=(), metadata=_ARTEFACT)  # the manifest's runtime_adapters

    def note(self) -> str:
        if self.skipped:
            return self.skipped
        return "; ".join(f"{name}: ppl x{q['perplexity_ratio']:.3f}, top-1 {q['top1_agreement']:.3f} vs merged fp32"
                         for name, q in self.adapters.items())


@dataclass(frozen=True)
class ManifestResult(StageResult):
    stage: ClassVar[str] = "manifest"
    files: int = 0
    format_version: int = 0
    manifest: Any = field(default=None, metadata=_ARTEFACT)  # the Manifest as written

    def note(self) -> str:
        return f"{self.files} files listed with sha256, format {self.format_version}"


RESULT_TYPES: dict[str, type[StageResult]] = {cls.stage: cls for cls in (
    PreflightResult, LoadResult, AdaptersResult, PruneResult, RotateResult, SmoothResult, AwqResult, SensitivityResult, ExportResult,
    StaticResult, FuseResult, QuantizeResult, DeviceResult, PackageResult, QualityResult, AdapterFilesResult,
    ManifestResult)}


def records(results: dict[str, StageResult]) -> dict[str, dict[str, Any]]:
    """Every result as the manifest records it (provenance.stages, without the seconds)."""
    return {name: result.record() for name, result in results.items()}


def from_record(stage: str, data: dict[str, Any]) -> StageResult | None:
    """A manifest's stage record as its typed result; None for a stage this edgelm does not know."""
    from edgelm.pipeline.encoder_results import ENCODER_RESULT_TYPES

    cls = RESULT_TYPES.get(stage) or ENCODER_RESULT_TYPES.get(stage)
    return cls.from_record(data) if cls is not None else None


def size_split_note(split: dict[str, Any]) -> str:
    """model.onnx's weights by role; a tied head shares the embedding's bytes, counted once."""
    mb = lambda value: f"{value:.1f}" if value >= 10 else f"{value:.2f}"  # noqa: E731
    head = "head tied to the embedding (counted once)" if split["head_tied"] else f"head {mb(split['head_mb'])} MB"
    return f"embedding {mb(split['embedding_mb'])} MB, layers {mb(split['layers_mb'])} MB, {head}"
