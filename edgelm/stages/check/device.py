"""Check that the final graphs are ones the device can take: every op in the profile's
`allowed_ops`, and with static shapes, no dimension left unknown anywhere in the graph.

An NPU compiler rejects a graph for one unsupported op or one dynamic dimension, on the device,
at load time, with an error far from its cause (onnxruntime#23832, #22439; Olive#1558). Checked
here, the build fails naming the op or the tensor, before anything ships."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from edgelm.errors import StageError
from edgelm.onnx_graph import op_counts
from edgelm.pipeline.results import DeviceResult
from edgelm.pipeline.stage import BuildState, Progress

def dynamic_tensors(model: onnx.ModelProto) -> list[str]:
    """Tensors (graph inputs, outputs and every inferred intermediate) with a dimension that is not a
    fixed number; shape inference runs with data propagation so Reshape targets resolve."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = inferred.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    found = []
    for value in values:
        if not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        if not tensor.HasField("shape") or any(not dim.HasField("dim_value") for dim in tensor.shape.dim):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
            found.append(f"{value.name} {dims if tensor.HasField('shape') else '(no shape)'}")
    return found


def shipped_graphs(state: BuildState) -> list[Path]:
    if state.static_graphs is not None:
        return [state.static_graphs.prefill, state.static_graphs.decode]
    return [state.current_onnx]


class CheckDevice:
    name = "device"
    title = "Check ops and shapes against the device profile"

    def run(self, state: BuildState, progress: Progress) -> DeviceResult:
        profile = state.plan.profile
        allowed, static = set(profile.allowed_ops), profile.export.static_shapes
        if not allowed and not static:
            return DeviceResult(skipped="the profile lists no allowed ops and uses dynamic shapes")
        facts: dict[str, Any] = {}
        for path in shipped_graphs(state):
            progress(self.name, 0, None, f"checking {path.name}")
            model = onnx.load(str(path), load_external_data=False)  # op types and shapes need no weights
            counts = op_counts(model)
            outside = sorted(op for op in counts if op not in allowed) if allowed else []
            if outside:
                listed = ", ".join(f"{op} x{counts[op]}" for op in outside)
                raise StageError(self.name, f"{path.name} has ops the {profile.name} device does not run: {listed}",
                                 hint="add them to the profile's allowed_ops only if the device supports them; "
                                      "else use another profile for this model")
            if static:
                dynamic = dynamic_tensors(model)
                if dynamic:
                    raise StageError(self.name, f"{path.name} is not fully static: {len(dynamic)} tensors with an unknown "
                                     f"dimension, e.g. {', '.join(dynamic[:3])}",
                                     hint="report this with --debug: static graphs must fix every dimension")
            facts[path.name] = {"ops": counts, "static": static}
        return DeviceResult(graphs=facts, allowed_ops=len(allowed))
