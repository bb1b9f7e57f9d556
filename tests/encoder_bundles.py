"""Encoder bundles (BERT family) for the runtime's tests, built by hand: the tiny random model
exported with torch.onnx (dynamic batch and sequence), its tokenizer.json, and a manifest written
with the runtime's own classes. They test the runtime against the bundle contract alone, including
layouts a build does not make today (cls/max pooling, a fixed sequence length, multi-label);
bundles that `edgelm build` makes are tested through the runtime in tests/arch/test_encoders.py."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

from edgelm_runtime.bundle import MODEL_FILE, TOKENIZER_FILE, EncoderLayout, Manifest, describe_files, write_manifest

_HEADS = {"feature-extraction": "AutoModel", "sequence-classification": "AutoModelForSequenceClassification",
          "token-classification": "AutoModelForTokenClassification"}


def source_dir(root: Path, family: str, task: str) -> Path:
    """The Hugging Face folder `encoder_bundle` builds from (the tests' PyTorch reference)."""
    return root / f"src-{family}-{task}"


def encoder_bundle(root: Path, family: str, task: str, **kw) -> Path:
    """A `family` encoder bundle for `task` under `root` (beside its source model, `source_dir`).
    `kw`: pooling ("mean"), normalize (True), max_length (the model's positions), static_seq_len,
    multi_label, name."""
    import torch
    import transformers

    from tests.conftest import save_tiny_encoder

    source = source_dir(root, family, task)
    if not (source / "config.json").is_file():
        save_tiny_encoder(source, family, task, sentence_transformers=task == "feature-extraction")
    model = getattr(transformers, _HEADS[task]).from_pretrained(source, attn_implementation="eager").eval()
    config = model.config
    inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids")
              if name in inspect.signature(model.forward).parameters]
    output = "last_hidden_state" if task == "feature-extraction" else "logits"
    folder = root / kw.get("name", f"{family}-{task}")
    folder.mkdir(parents=True)

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(**dict(zip(inputs, tensors)))[0]

    example = torch.ones((2, 8), dtype=torch.int64)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    axes[output] = {0: "batch", 1: "sequence"} if output == "last_hidden_state" or task == "token-classification" \
        else {0: "batch"}
    torch.onnx.export(Graph(), tuple(example for _ in inputs), str(folder / MODEL_FILE), input_names=inputs,
                      output_names=[output], dynamic_axes=axes, opset_version=17, dynamo=False)
    shutil.copyfile(source / "tokenizer.json", folder / TOKENIZER_FILE)
    hidden = getattr(config, "hidden_size", None) or config.dim
    # RoBERTa's positions start after padding_idx: 130 position embeddings hold 128 tokens
    max_length = kw.get("max_length", config.max_position_embeddings - (2 if family == "roberta" else 0))
    labels = tuple(config.id2label[i] for i in range(config.num_labels)) if task != "feature-extraction" else ()
    encoder = EncoderLayout(task=task, inputs=tuple(inputs), output=output, hidden_size=hidden, max_length=max_length,
                            pad_token_id=config.pad_token_id,
                            pooling=kw.get("pooling", "mean") if task == "feature-extraction" else None,
                            normalize=kw.get("normalize", True) if task == "feature-extraction" else False,
                            labels=labels, multi_label=kw.get("multi_label", False),
                            static_seq_len=kw.get("static_seq_len"))
    manifest = Manifest(name=folder.name, profile="cpu-fp32", provider="CPUExecutionProvider", model_file=MODEL_FILE,
                        tokenizer_file=TOKENIZER_FILE, kv=None, max_seq_len=max_length, vocab_size=config.vocab_size,
                        eos_token_ids=(), encoder=encoder, files=describe_files(folder))
    write_manifest(folder, manifest)
    return folder
