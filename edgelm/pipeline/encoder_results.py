"""What the encoder-only stages of a build did, as typed results (edgelm/pipeline/results.py
explains the contract). The load, fuse, quantize, package and manifest stages of an encoder build
return the decoders' result types; export and quality measure other things."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgelm.pipeline.results import _ARTEFACT, StageResult


@dataclass(frozen=True)
class EncoderExportResult(StageResult):
    stage: ClassVar[str] = "encoder_export"
    inputs: list[str] = field(default_factory=list)
    output: str = ""
    opset: int = 0
    size_mb: float = 0.0
    max_abs_diff: float = 0.0          # ONNX vs PyTorch on a padded probe batch, real positions
    attention: int = 0                 # MultiHeadAttention nodes (one per layer)
    plain_attention: str | None = None  # why attention stayed in plain ops (arch.attention_refusal)
    probe: Any = field(default=None, metadata=_ARTEFACT)  # (feeds, PyTorch output): the fuse stage's parity

    def note(self) -> str:
        attention = f"plain attention ({self.plain_attention})" if self.plain_attention else \
            f"MultiHeadAttention x{self.attention}"
        return f"{', '.join(self.inputs)} -> {self.output}, {attention}, {self.size_mb} MB, parity {self.max_abs_diff:.1e}"


@dataclass(frozen=True)
class EncoderQuantizeResult(StageResult):
    """What the profile's encoder scheme did (edgelm/quant/encoder.py)."""

    stage: ClassVar[str] = "encoder_quantize"
    scheme: str = ""
    weight_matmuls: int | None = None
    size_mb_before: float | None = None
    size_mb_after: float | None = None
    calibration_feeds: int | None = None
    embeddings: str | None = None  # "int4": the token embedding as GatherBlockQuantized

    @property
    def shown(self) -> bool:
        return True  # "fp32: no quantization" is worth a row

    def note(self) -> str:
        if self.skipped:
            return self.skipped
        calibration = f", {self.calibration_feeds} calibration batches" if self.calibration_feeds else ""
        embedding = ", 4-bit token embedding" if self.embeddings == "int4" else ""
        return (f"{self.scheme}: {self.weight_matmuls} weight MatMuls{embedding}, {self.size_mb_before} -> "
                f"{self.size_mb_after} MB{calibration}")


@dataclass(frozen=True)
class EncoderQualityResult(StageResult):
    """The bundle against the fp32 export, on held-out text, through edgelm-runtime."""

    stage: ClassVar[str] = "encoder_quality"
    task: str = ""
    texts: int = 0
    provider: str = ""
    mean_cosine: float | None = None          # feature-extraction
    min_cosine: float | None = None
    retrieval_agreement: float | None = None  # the same top-1 document as fp32 for each query
    retrieval_accuracy: float | None = None   # the query's own paragraph ranked first (bundle)
    reference_retrieval_accuracy: float | None = None  # (fp32)
    label_agreement: float | None = None      # classification: the same label as fp32
    accuracy: float | None = None             # with quality.labelled_data: the bundle's accuracy
    reference_accuracy: float | None = None   # and fp32's
    labelled: int | None = None
    entity_f1: float | None = None            # token classification: the bundle's entities vs fp32's
    entities: int | None = None

    def note(self) -> str:
        if self.task == "feature-extraction":
            return (f"cosine mean {self.mean_cosine:.4f} (min {self.min_cosine:.4f}), retrieval top-1 agrees "
                    f"{self.retrieval_agreement:.3f} (accuracy {self.retrieval_accuracy:.3f} vs "
                    f"{self.reference_retrieval_accuracy:.3f} fp32) on {self.texts} texts")
        if self.task == "sequence-classification":
            accuracy = "" if self.accuracy is None else \
                f", accuracy {self.accuracy:.3f} vs {self.reference_accuracy:.3f} fp32 on {self.labelled}"
            return f"labels agree {self.label_agreement:.3f} on {self.texts} texts{accuracy}"
        return f"entity F1 vs fp32 {self.entity_f1:.3f} ({self.entities} fp32 entities, {self.texts} texts)"


ENCODER_RESULT_TYPES: dict[str, type[StageResult]] = {cls.stage: cls for cls in (EncoderExportResult, EncoderQuantizeResult,
                                                                               EncoderQualityResult)}
