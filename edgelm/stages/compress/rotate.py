"""Rotate the residual stream, the value heads and the down projection's input with Hadamard
matrices before export (QuaRot-style), so that static int8 activations need no fp32 MatMuls.

Through the family's arch, in place, on the fp32 model:
1. Each pre-norm's weight folds into the Linears that read it (norms become x / rms(x)), the final
   norm's into the LM head; a head tied to the embedding is untied first.
2. R1, one rotation Q of the hidden size: the embedding's rows and every residual writer (output
   and down projections) rotate their outputs (W -> Q^T W), every reader (q/k/v, gate/up, the
   head) their inputs (W -> W Q). RMS normalisation commutes with an orthogonal Q.
3. R2, one rotation of head_dim per value head: the value rows rotate, the output projection's
   columns of every query head rotate back (all heads of a GQA group share their value head).
4. R4, the down projection's input (after the gate's nonlinearity, where no rotation folds): the
   graph rotates it online (quant/rotation.py, two small float MatMuls), the weight undoes it.

The fp32 function is unchanged: the stage compares the logits before and after on calibration
prompts and fails past a tolerance (export then checks parity again). Families with norms after a
residual branch (Gemma's post-norms) are left unrotated, the reason recorded: no rotation folds
through those."""

from __future__ import annotations

from typing import Any

from edgelm.errors import StageError
from edgelm.pipeline.results import RotateResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.quant import scheme_for
from edgelm.quant.rotation import ROTATION_MODULE, is_hadamard, online_rotation, rotation_matrix

PARITY_TOLERANCE = 1e-3  # max |logit change| / max |logit| before the build stops
PARITY_TOKENS = 64


def refusal(arch: Any, model: Any) -> str | None:
    """Why the rotation cannot fold into this model (None: it can)."""
    norms = arch.norms(arch.layers(model)[0])
    if norms.attention_out is not None or norms.mlp_out is not None:
        return f"{arch.name} normalises each residual branch's output (post-norms), which no rotation folds through"
    return None


def _fold_norm(norm: Any, readers: tuple[Any, ...], offset: float) -> None:
    """norm(x) = x_hat * g feeding `readers`: g moves into their input columns, norm keeps x_hat."""
    gain = norm.weight.float() + offset
    for linear in readers:
        linear.weight.mul_(gain.to(linear.weight.dtype))
    norm.weight.fill_(1.0 - offset)


def _rotate_inputs(linear: Any, q: Any) -> None:
    linear.weight.copy_(linear.weight.float() @ q)


def _rotate_outputs(weight: Any, bias: Any, q: Any) -> None:
    """Output rows y -> y Q: W -> Q^T W (rows indexed by output), b -> b Q."""
    weight.copy_(q.T @ weight.float())
    if bias is not None:
        bias.copy_(bias.float() @ q)


def _online_down(linear: Any) -> None:
    """The down projection reads x H (the graph rotates its input) and its weight undoes it."""
    rotation = online_rotation(linear.in_features)
    setattr(linear, ROTATION_MODULE, rotation)  # a child module: the hook below and the static export call it
    linear.register_forward_pre_hook(lambda module, inputs: (getattr(module, ROTATION_MODULE)(inputs[0]), *inputs[1:]))
    _rotate_inputs(linear, rotation.matrix().float())


def rotate_model(model: Any, seed: int = 0) -> dict[str, Any]:
    """Apply the rotations above in place; returns what was rotated."""
    import torch

    from edgelm.arch import for_model

    arch, config = for_model(model), model.config
    why = refusal(arch, model)
    if why:
        raise ValueError(why)
    heads, kv_heads, head_dim = arch.config_attention(config)
    embedding, head, final_norm = arch.embedding(model), arch.head(model), arch.final_norm(model)
    tied = head.weight is embedding.weight
    with torch.no_grad():
        if tied:
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            config.tie_word_embeddings = False
        hidden = embedding.weight.shape[1]
        q1 = torch.tensor(rotation_matrix(hidden, seed), dtype=torch.float32)
        q2 = torch.tensor(rotation_matrix(head_dim, seed + 2), dtype=torch.float32)
        embedding.weight.copy_(embedding.weight.float() @ q1)
        _fold_norm(final_norm, (head,), arch.norm_offset)
        _rotate_inputs(head, q1)
        for i, layer in enumerate(arch.layers(model)):
            attention_in, mlp_in, _down = arch.input_groups(layer, i, config)
            for group in (attention_in, mlp_in):
                _fold_norm(group.fold.norm, group.readers, arch.norm_offset)
                for linear in group.readers:
                    _rotate_inputs(linear, q1)
            output, down = arch.role(layer, "o", config).linear, arch.role(layer, "down", config).linear
            for writer in (output, down):
                _rotate_outputs(writer.weight, writer.bias, q1)
            value = arch.role(layer, "v", config)
            for h in range(kv_heads):
                rows = slice(value.rows.start + h * head_dim, value.rows.start + (h + 1) * head_dim)
                bias = None if value.linear.bias is None else value.linear.bias[rows]
                _rotate_outputs(value.linear.weight[rows], bias, q2)
            for h in range(heads):
                columns = output.weight[:, h * head_dim:(h + 1) * head_dim]
                columns.copy_(columns.float() @ q2)
            _online_down(down)
    online = getattr(arch.role(arch.layers(model)[0], "down", config).linear, ROTATION_MODULE)
    intermediate = online.blocks * len(online.right)
    whole = online.left_t is not None or online.blocks == 1  # else a Hadamard within each block (online_factors)
    return {"hidden_rotation": f"{'Hadamard' if is_hadamard(hidden) else 'random orthogonal'} {hidden}",
            "head_rotation": f"{'Hadamard' if is_hadamard(head_dim) else 'random orthogonal'} {head_dim}",
            "online_rotation": f"{'Hadamard' if whole else f'blockwise Hadamard {len(online.right)} of'} {intermediate}",
            "untied_head": tied, "layers": len(arch.layers(model))}


def _logits(model: Any, token_ids: list[list[int]]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids[:PARITY_TOKENS]]), use_cache=False).logits[0].double() for ids in token_ids]


class Rotate:
    name = "rotate"
    title = "Hadamard rotations: spread activation outliers before int8"

    def run(self, state: BuildState, progress: Progress) -> RotateResult:
        settings = state.plan.profile.quantization
        skipped = scheme_for(settings).skip_reason(self.name, settings)
        if skipped:
            return RotateResult(skipped=skipped)
        from edgelm.arch import for_model
        from edgelm.calibration import plan_token_ids

        why = refusal(for_model(state.model), state.model)
        if why:  # the profile's rotation applies where the family allows it; the manifest says why not here
            return RotateResult(skipped=f"not rotated: {why}")
        token_ids = plan_token_ids(state)[:2]
        progress(self.name, 0, 3, "reference logits")
        before = _logits(state.model, token_ids)
        progress(self.name, 1, 3, "rotating")
        facts = rotate_model(state.model)
        progress(self.name, 2, 3, "parity")
        after = _logits(state.model, token_ids)
        change = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(after, before))
        if change > PARITY_TOLERANCE:
            raise StageError(self.name, f"the rotated model's logits moved {change:.2g} of their range (tolerance "
                             f"{PARITY_TOLERANCE})", hint="report this with --debug; set quantization.rotation: none to build")
        return RotateResult(**facts, parity=float(f"{change:.3g}"))
