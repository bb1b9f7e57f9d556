"""What each choice of the npu-qdq profile costs in fidelity: static prefill graphs of one model,
exported and quantized every-op (onnxruntime's QNN rules) in several ways, each measured against
the fp32 model on the build's held-out windows (perplexity ratio, top-1 agreement, KL).

    python benchmarks/npu_variants.py [--model default] [--samples 32] [--windows 8] \\
        --variant "decomposed-norm: {opset: 18, projections: matmul, weights: uint8}" \\
        --variant "matmul-per-tensor: {opset: 23, projections: matmul, weights: uint8}" \\
        --variant "conv-per-channel: {opset: 23, projections: conv1x1, weights: int8, per_channel: true}"

Only the prefill graph is built: the windows (256 tokens) run as prefill chunks, as in the build's
quality check. opset 18 turns RMSNormalization into Pow/ReduceMean/Sqrt (what the profile refuses)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (the build's default)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--prefill-len", type=int, default=32)
    parser.add_argument("--kv-window", type=int, default=512)
    parser.add_argument("--variant", action="append", required=True, help='"name: {opset, projections, weights, per_channel}"')
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from edgelm.eval.metrics import window_stats
    from edgelm.eval.text import eval_windows
    from edgelm.calibration import StaticCalibrationFeeds, calibration_token_ids
    from edgelm.stages.export.decoder import kv_shape
    from edgelm.stages.load.model import load_pretrained
    from edgelm.stages.export.static import StaticGraphs, export_static_graph
    from edgelm_runtime.bundle import StaticLayout
    from edgelm_runtime.scoring import log_softmax
    from edgelm_runtime.static import StaticWindow

    loaded = load_pretrained(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    kv = kv_shape(model.config)
    layout = StaticLayout(decode_model_file="decode.onnx", prefill_len=args.prefill_len, kv_window=args.kv_window)
    windows = eval_windows("builtin", args.windows, args.window_len,
                           lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    token_ids = calibration_token_ids("builtin", tokenizer, tokenizer.chat_template, args.samples, 256)
    results = []
    with tempfile.TemporaryDirectory(prefix="npu-variants-") as scratch:
        for spec in args.variant:
            name, _, body = spec.partition(":")
            options = yaml.safe_load(body) or {}
            start = time.perf_counter()
            folder = Path(scratch) / name.strip()
            prefill, decode = folder / "fp32" / "model.onnx", folder / "fp32-decode" / "decode.onnx"
            projections = options.get("projections", "matmul")
            export_static_graph(model, prefill, options.get("opset", 23), args.prefill_len, layout, projections)
            export_static_graph(model, decode, options.get("opset", 23), 1, layout, projections)
            graphs = StaticGraphs(prefill, decode, layout)
            feeds = StaticCalibrationFeeds(graphs, token_ids, kv, 0, "prefill")
            weights = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16}[options.get("weights", "uint8")]
            config = get_qnn_qdq_config(str(prefill), feeds, activation_type=QuantType.QUInt16, weight_type=weights,
                                        per_channel=bool(options.get("per_channel", False)))
            quantized = folder / "qdq" / "model.onnx"
            quantized.parent.mkdir(parents=True)
            quantize(str(prefill), str(quantized), config)
            fp32 = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (prefill, decode)]
            qdq = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
            nll_q = nll_f = agree = kl = count = 0.0
            for ids in windows:
                reference = StaticWindow(*fp32, layout, *kv, np.float32).feed(np.asarray(ids), all_logits=True)
                candidate = StaticWindow(qdq, fp32[1], layout, *kv, np.float32).feed(np.asarray(ids), all_logits=True)
                stats = window_stats(log_softmax(candidate[:-1]), log_softmax(reference[:-1]), ids)
                nll_q, nll_f, agree, kl = nll_q + stats[0], nll_f + stats[1], agree + stats[2], kl + stats[3]
                count += len(ids) - 1
            size = sum(p.stat().st_size for p in quantized.parent.iterdir())
            result = {"variant": name.strip(), **options, "perplexity_ratio": round(float(np.exp((nll_q - nll_f) / count)), 4),
                      "top1_agreement": round(agree / count, 4), "kl_divergence": round(kl / count, 4),
                      "prefill_graph_mb": round(size / 1e6, 1), "seconds": round(time.perf_counter() - start, 1)}
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\n{'variant':24} {'ratio':>8} {'top-1':>7} {'KL':>8} {'MB':>7}")
    for r in results:
        print(f"{r['variant']:24} {r['perplexity_ratio']:8.3f} {r['top1_agreement']:7.3f} {r['kl_divergence']:8.4f} "
              f"{r['prefill_graph_mb']:7.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
