"""Quantization schemes of encoder graphs, named by a profile's `encoder.quantization`.

An encoder graph has no KV cache and is compute-bound at batch 32 (every weight is reused across
the batch's tokens), so int8 kernels pay, unlike decode at batch 1. Each scheme is onnxruntime's
own pass on the fused graph:
  dynamic-int8     quantize_dynamic: int8 weights per channel, activations quantized per tensor at
                   run time (MatMulInteger), no calibration
  static-int8      quantize_static: QDQ on the weight MatMuls' inputs, u8 per-channel weights,
                   activation ranges calibrated on real text (the calibration prompts)
  weight-only-int4 MatMulNBits, 4-bit blocks of 32, int8 compute per block (accuracy_level 4)
  float16          fp16 weights and activations, float32 at the graph's edge
  qnn-qdq          QDQ on every op of the fixed-shape graph with onnxruntime's QNN rules (uint16
                   activations, int8 per-channel weights), calibrated on real text: what an NPU runs
Which one a CPU profile uses was measured on MiniLM (docs/encoders.md)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import StageError

STAGE = "encoder_quantize"


class TextFeeds:
    """onnxruntime's CalibrationDataReader over real texts, one padded batch of 8 per feed (with
    `static`: one text per feed, padded to max_length, as a fixed-shape graph takes it)."""

    def __init__(self, texts: list[str], tokenizer: Any, inputs: list[str], max_length: int, static: bool = False) -> None:
        size = 1 if static else 8
        self._batches = [texts[i:i + size] for i in range(0, len(texts), size)]
        self._tokenizer, self._inputs, self._max_length, self._static = tokenizer, inputs, max_length, static
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.count >= len(self._batches):
            return None
        encoded = self._tokenizer(self._batches[self.count], padding="max_length" if self._static else True,
                                  truncation=True, max_length=self._max_length, return_tensors="np")
        self.count += 1
        feeds = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        feeds["token_type_ids"] = np.zeros_like(encoded["input_ids"])
        return {name: feeds[name].astype(np.int64) for name in self._inputs}

    def rewind(self) -> None:
        self.count = 0


def quantize_encoder(scheme: str, source: Path, target: Path, calibration: TextFeeds | None,
                     embeddings: str = "float") -> dict[str, Any]:
    """Write `source` quantized by `scheme` (and its token embedding to 4 bits with
    embeddings="int4") to `target`; returns the facts the manifest records."""
    import onnx

    from edgelm.onnx_graph import save_external
    from edgelm.quant.graph import size_mb, weight_matmuls

    target.parent.mkdir(parents=True, exist_ok=True)
    matmuls = list(weight_matmuls(onnx.load(str(source), load_external_data=False)))
    if scheme == "none":
        save_external(onnx.load(str(source)), target)
        expect = None
    elif scheme == "dynamic-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], nodes_to_quantize=matmuls,
                         per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})
        expect = "MatMulInteger"
    elif scheme == "static-int8":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(source), str(target), calibration, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], nodes_to_quantize=matmuls, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                                           "OpTypesToExcludeOutputQuantization": ["MatMul"]})
        expect = "DequantizeLinear"
    elif scheme == "qnn-qdq":
        from onnxruntime.quantization import QuantType, quantize as ort_quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

        from edgelm.quant.graph import quiet_root_logger

        config = get_qnn_qdq_config(str(source), calibration, per_channel=True, activation_type=QuantType.QUInt16,
                                    weight_type=QuantType.QInt8)
        with quiet_root_logger():
            ort_quantize(str(source), str(target), config)
        expect = "QuantizeLinear"
    elif scheme == "weight-only-int4":
        from edgelm.config.profile import WeightOnly
        from edgelm.quant.matmul_nbits import quantize_weight_only

        settings = WeightOnly(mode="weight-only", bits=4, block_size=32, symmetric=True, accuracy_level=4)
        save_external(quantize_weight_only(onnx.load(str(source)), settings, matmuls), target)
        expect = "MatMulNBits"
    elif scheme == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(source))
        edge = [v.name for v in [*model.graph.input, *model.graph.output]]
        save_external(convert_float_to_float16(model, keep_io_types=edge, disable_shape_infer=True), target)
        expect = None
    else:
        raise StageError(STAGE, f"encoder.quantization {scheme!r} is not a scheme", hint="see edgelm/quant/encoder.py")
    if embeddings == "int4":
        quantize_embedding(target)
        scheme_facts = {"embeddings": "int4"}
    else:
        scheme_facts = {}
    graph = onnx.load(str(target), load_external_data=False).graph
    if expect and not any(node.op_type == expect for node in graph.node):
        raise StageError(STAGE, f"{scheme}: the quantized graph has no {expect} node", hint="report this with --debug")
    facts = {"scheme": scheme, "weight_matmuls": len(matmuls), "size_mb_before": size_mb(source),
             "size_mb_after": size_mb(target), **scheme_facts}
    if calibration is not None:
        facts["calibration_feeds"] = calibration.count
    return facts


def quantize_embedding(path: Path) -> None:
    """The token embedding's Gather (the largest table a Gather reads) as 4-bit GatherBlockQuantized,
    blocks of 32 along the hidden axis; position and token-type tables stay float."""
    import onnx

    from edgelm.onnx_graph import save_external
    from edgelm.quant.matmul_nbits import _nbits

    nbits = _nbits()
    model = onnx.load(str(path))
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    gathers = [node for node in model.graph.node if node.op_type == "Gather" and node.input[0] in sizes]
    if not gathers:
        raise StageError(STAGE, "embeddings: int4 found no embedding Gather in the graph", hint="report this with --debug")
    token = max(gathers, key=lambda node: sizes[node.input[0]])
    quantizer = nbits.MatMulNBitsQuantizer(
        model, nodes_to_exclude=[node.name for node in gathers if node is not token],
        algo_config=nbits.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=4,
                                                       op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),)))
    quantizer.process()
    save_external(quantizer.model.model, path)
