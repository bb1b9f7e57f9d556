"""Shared fixtures: a tiny random Llama (hidden 64, 2 layers, GQA) with a real trained BPE
tokenizer and chat template, saved as safetensors, and bundles built from it once per session."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

# A test run started in the background (`make test &` in a script) inherits SIGINT *ignored*, and so
# would every CLI process the tests start: a Ctrl-C test would see its signal vanish whenever it
# lands before the CLI installs its own handler. Start the children as a terminal would.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_RECIPE = """\
max_seq_len: 256
calibration: {samples: 6, decode_steps: 3, max_prompt_tokens: 48}
quality: {windows: 2, window_len: 64, chat_prompts: 6, chat_tokens: 8}
"""


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgelm.calibration import builtin_prompts

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(builtin_prompts() * 4, trainer)
    return tokenizer


def save_tiny_model(folder: Path, model_type: str = "llama", seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    backend = _train_tokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = AutoConfig.for_model(
        model_type, vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        rope_theta=100000.0, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# One tiny config per family, scaled down but keeping what the family differs in: a sliding window
# (16) shorter than the tests' sequences, q/k norms, partial rotary + longrope, NoPE layers, packed
# projections, soft-caps, (1 + w) norms and a scaled embedding, llama3 rope scaling, q/k/v biases.
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {"num_hidden_layers": 2, "tie_word_embeddings": True,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "mistral": {"num_hidden_layers": 2, "sliding_window": 16, "tie_word_embeddings": False},
    "qwen2": {"num_hidden_layers": 2, "tie_word_embeddings": True},
    "qwen3": {"num_hidden_layers": 2, "head_dim": 16, "tie_word_embeddings": True},
    "gemma3_text": {"num_hidden_layers": 3, "head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 24,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": True,
                    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}},
    "phi3": {"num_hidden_layers": 2, "tie_word_embeddings": False, "original_max_position_embeddings": 512,
             "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                 "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                 "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}},
    "smollm3": {"num_hidden_layers": 3, "no_rope_layers": [1, 1, 0], "no_rope_layer_interval": 3,
                "tie_word_embeddings": True},
}


def save_tiny_family(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A tiny random model of `family` from that family's own transformers config class
    (`overrides`: config fields over FAMILY_CONFIGS[family])."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    backend = _train_tokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    fields = {"vocab_size": backend.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
              "pad_token_id": tokenizer.pad_token_id, **FAMILY_CONFIGS[family], **overrides}
    config = AutoConfig.for_model(family, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms, so a wrong (1 + w) fold or a skipped norm shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


ENCODER_FAMILIES = ("bert", "roberta", "distilbert", "modernbert")
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
_ENCODER_HEADS = {"feature-extraction": "AutoModel", "sequence-classification": "AutoModelForSequenceClassification",
                  "token-classification": "AutoModelForTokenClassification"}


def _train_wordpiece(family: str):
    """A WordPiece (BERT, DistilBERT) or byte-level BPE (RoBERTa) tokenizer with the family's
    special tokens and post-processor, trained on the calibration prompts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from edgelm.calibration import builtin_prompts

    if family == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(builtin_prompts() * 4, trainer)
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=True)
        return tokenizer, {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
                           "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(builtin_prompts() * 4, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tokenizer, {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                       "mask_token": "[MASK]"}


def save_tiny_encoder(folder: Path, family: str = "bert", task: str = "feature-extraction", seed: int = 0,
                      sentence_transformers: bool = False, **overrides) -> Path:
    """A tiny random encoder of `family` (bert, roberta, distilbert, modernbert; hidden 32, 2 layers) for
    `task`, saved as safetensors with its tokenizer: sequence classification with labels
    negative/positive, token classification with NER_LABELS. `sentence_transformers`: also write
    modules.json and 1_Pooling/config.json (mean pooling) and a Normalize module, as
    sentence-transformers saves a model."""
    import json

    import torch
    import transformers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    backend, specials = _train_wordpiece(family)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=128, **specials)
    labels = {"sequence-classification": ("negative", "positive"), "token-classification": NER_LABELS}.get(task, ())
    sizes = ({"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4} if family == "distilbert" else
             {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
    if family == "modernbert":  # a global and a sliding-window layer (window 16, shorter than the tests' texts)
        sizes |= {"local_attention": 16, "global_attn_every_n_layers": 2,
                  "cls_token_id": backend.token_to_id("[CLS]"), "sep_token_id": backend.token_to_id("[SEP]")}
    fields = {"vocab_size": backend.get_vocab_size(), "max_position_embeddings": 130 if family == "roberta" else 128,
              "pad_token_id": backend.token_to_id(specials["pad_token"]), **sizes, **overrides}
    if labels:
        fields |= {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}
    config = AutoConfig.for_model(family, **fields)
    torch.manual_seed(seed)
    model = getattr(transformers, _ENCODER_HEADS[task]).from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if sentence_transformers:
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": model.config.hidden_size if family != "distilbert" else model.config.dim,
             "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return folder


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_family(root / f"tiny-{family}", family) for family in FAMILY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def _build(model_dir: Path, recipe: Path, profile: str, output: Path):
    from edgelm import api

    plan = api.plan_build(profile=profile, recipe=recipe, model=str(model_dir), name=output.name)
    return api.build(plan, output)


@pytest.fixture(scope="session")
def tiny_bundle_report(tiny_model_dir, tiny_recipe, tmp_path_factory):
    return _build(tiny_model_dir, tiny_recipe, "cpu-fp32", tmp_path_factory.mktemp("bundles") / "tiny-fp32")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_report) -> Path:
    return tiny_bundle_report.output


@pytest.fixture(scope="session")
def tiny_long_bundle(tiny_model_dir, tiny_recipe, tmp_path_factory) -> Path:
    """The tiny model with a 1024-token context: room for a tool prompt in its small-vocabulary tokenizer."""
    from edgelm import api
    from edgelm.config.plan import BuildOverrides

    plan = api.plan_build(profile="cpu-fp32", recipe=tiny_recipe, model=str(tiny_model_dir), name="tiny-long",
                          overrides=BuildOverrides(max_seq_len=1024))
    return api.build(plan, tmp_path_factory.mktemp("bundles") / "tiny-long").output


@pytest.fixture(scope="session")
def tiny_int8_report(tiny_model_dir, tiny_recipe, tmp_path_factory):
    return _build(tiny_model_dir, tiny_recipe, "cpu-w8a8", tmp_path_factory.mktemp("bundles") / "tiny-int8")


# Hugging Face Llama parameter name (after "model.layers.N.") -> llama.cpp's GGUF tensor name.
_GGUF_LAYER_TENSORS = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _permute_rows(weight, n_head: int, n_head_kv: int):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half q/k row order -> GGML's interleaved one."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)


def _add_gpt2_vocab(writer, model_dir: Path, config: dict, tokenizer: dict) -> None:
    """The vocabulary as convert_hf_to_gguf.py's _set_vocab_gpt2 writes it: tokens in id order,
    special added tokens CONTROL; merges, bos/eos/unk/pad ids and the chat template as it reads them."""
    import gguf

    id_to_token = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    special = {added["id"] for added in tokenizer["added_tokens"] if added["special"]}
    for added in tokenizer["added_tokens"]:
        id_to_token[added["id"]] = added["content"]
    tokens = [id_to_token[index] for index in range(config["vocab_size"])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
                            for index in range(len(tokens))])
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def save_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """Write the safetensors model in `model_dir` as one F32 GGUF file, laid out like llama.cpp's
    convert_hf_to_gguf.py does for a Llama with a GPT-2 style (byte-level BPE) tokenizer."""
    import json

    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]
    rope = config.get("rope_parameters") or {}

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])

    _add_gpt2_vocab(writer, model_dir, config, tokenizer)

    weights = load_file(str(model_dir / "model.safetensors"))
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in _GGUF_LAYER_TENSORS.items():
            data = weights[f"model.layers.{layer}.{hf_name}"]
            if gguf_name == "attn_q.weight":
                data = _permute_rows(data, n_head, n_head)
            elif gguf_name == "attn_k.weight":
                data = _permute_rows(data, n_head, n_head_kv)
            writer.add_tensor(f"blk.{layer}.{gguf_name}", data)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights:  # absent when tied: the loader then ties output to token_embd
        writer.add_tensor("output.weight", weights["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# llama.cpp's GGUF architecture per family (convert_hf_to_gguf.py writes Mistral as llama). transformers
# reads GGUF for these; SmolLM3 has no GGUF mapping in transformers.
GGUF_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gemma3_text": "GEMMA3",
              "phi3": "PHI3"}
# What a GGUF cannot state, so a family's tiny model for a GGUF round trip leaves it at what llama.cpp
# assumes: Gemma 3's sliding/global pattern is fixed (every 6th layer global), its attention scale is
# 1/sqrt(head_dim) and it has no soft-caps (the converter asserts none).
GGUF_FAMILY_OVERRIDES: dict[str, dict] = {
    "gemma3_text": {"num_hidden_layers": 6, "query_pre_attn_scalar": 16, "final_logit_softcapping": None,
                    "attn_logit_softcapping": None, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]},
}


def save_tiny_family_gguf(model_dir: Path, path: Path, family: str) -> Path:
    """Write the safetensors model of `family` in `model_dir` as one F32 GGUF, as llama.cpp's
    convert_hf_to_gguf.py does: gguf-py's tensor names, q/k rows permuted for the llama architecture
    only, Gemma's (1 + w) norms stored as w + 1 and its tied head left out, Phi-3's partial rotary
    as rope.dimension_count and longrope as rope_factors_{long,short} tensors, key_length = head_dim."""
    import json
    import math

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCHS[family])
    n_head, n_head_kv, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim, layers = config.get("head_dim") or hidden // n_head, config["num_hidden_layers"]
    rope = config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: rope.freq_base is the global layers' theta

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    extra = {}
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(head_dim)
        if rope.get("rope_type") == "llama3":  # the converter's rope_freqs (its original context: rope_parameters')
            from edgelm.stages.load.gguf_config import _llama3_factors

            extra = {"rope_freqs.weight": np.asarray(_llama3_factors(
                rope["rope_theta"], head_dim, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                rope["original_max_position_embeddings"]), np.float32)}
    elif arch == gguf.MODEL_ARCH.GEMMA3:
        writer.add_sliding_window(config["sliding_window"])
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
    elif arch == gguf.MODEL_ARCH.PHI3:
        original = rope.get("original_max_position_embeddings") or config["original_max_position_embeddings"]
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * hidden) // n_head)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if rope.get("long_factor"):
            scale = config["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
            extra = {"rope_factors_long.weight": np.asarray(rope["long_factor"], np.float32),
                     "rope_factors_short.weight": np.asarray(rope["short_factor"], np.float32)}

    _add_gpt2_vocab(writer, model_dir, config, tokenizer)

    names = gguf.get_tensor_name_map(arch, layers)
    for name, data in load_file(str(model_dir / "model.safetensors")).items():
        if arch == gguf.MODEL_ARCH.GEMMA3 and name == "lm_head.weight":
            continue
        module, suffix = name.rsplit(".", 1)
        target = names.get_name(module)
        assert target, f"no GGUF name for {name}"
        if arch == gguf.MODEL_ARCH.LLAMA and target.endswith(".attn_q"):
            data = _permute_rows(data, n_head, n_head)
        elif arch == gguf.MODEL_ARCH.LLAMA and target.endswith(".attn_k"):
            data = _permute_rows(data, n_head, n_head_kv)
        elif arch == gguf.MODEL_ARCH.GEMMA3 and module.endswith("norm"):
            data = data + np.float32(1.0)
        writer.add_tensor(f"{target}.{suffix}", data)
    for name, data in extra.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf_file(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as an F32 GGUF (llama.cpp's Llama layout, q/k rows permuted), alone in its folder
    so transformers cannot pick up the safetensors folder's config or tokenizer files."""
    return save_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf")


def npu_profile(folder: Path, quantized: bool = True, **export) -> Path:
    """npu-qdq as a profile file, with a small window for tiny models (`export` fields override);
    quantized=False keeps the static graphs in fp32 (the runtime's reference for them)."""
    import yaml

    from edgelm.config import load_profile

    data = load_profile("npu-qdq").model_dump(mode="json")
    data["export"].update({"prefill_len": 16, "kv_window": 128, **export})
    if not quantized:
        data["name"], data["quantization"] = "npu-fp32", {"mode": "none"}
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def tiny_static_bundles(tiny_model_dir, tiny_recipe, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as static NPU bundles (window 128, chunks of 16): "fp32" and "qdq" (npu-qdq)."""
    folder = tmp_path_factory.mktemp("static")
    return {kind: _build(tiny_model_dir, tiny_recipe, str(npu_profile(folder, quantized=kind == "qdq")),
                         folder / f"tiny-npu-{kind}").output for kind in ("fp32", "qdq")}


def run_until(plan, tmp_path: Path, last: str):
    """A BuildState after the build's stages up to and including `last` (edgelm.api.PIPELINE
    order): a focused pass test starts from the state its pass really gets."""
    from edgelm import api
    from edgelm.pipeline.runner import run_stages
    from edgelm.pipeline.stage import BuildState, no_progress

    names = [stage.name for stage in api.PIPELINE]
    stages = api.PIPELINE[: names.index(last) + 1]
    (tmp_path / "work").mkdir(parents=True, exist_ok=True)
    (tmp_path / "bundle").mkdir(parents=True, exist_ok=True)
    state = BuildState(plan=plan, work_dir=tmp_path / "work", bundle_dir=tmp_path / "bundle")
    return run_stages(stages, state, no_progress)


@pytest.fixture(scope="session")
def tiny_encoder_bundles(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BERT encoder bundles, one per task (feature-extraction: mean pooling, normalised);
    the PyTorch model each was built from is tests.encoder_bundles.source_dir(bundle.parent, "bert", task)."""
    from edgelm_runtime.bundle import ENCODER_TASKS
    from tests.encoder_bundles import encoder_bundle

    root = tmp_path_factory.mktemp("encoders")
    return {task: encoder_bundle(root, "bert", task) for task in ENCODER_TASKS}
