"""End to end on the real SmolLM2-135M-Instruct: build cpu-int8 with the CLI exactly as the
README says (no --model), then generate and chat with the bundle through the torch-free runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_int8_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "smollm2-int8"
    result = subprocess.run(["edgelm", "build", "--profile", "cpu-int8", "-o", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "quality" in result.stdout and "total" in result.stdout  # the summary table
    return out


def test_manifest_has_parity_fusions_and_quality(real_int8_bundle):
    manifest = json.loads((real_int8_bundle / "manifest.json").read_text())
    stages = manifest["provenance"]["stages"]
    assert max(stages["export"]["parity"]["max_abs_diff_no_past"], stages["export"]["parity"]["max_abs_diff_with_past"]) < 1e-2
    assert stages["fuse"]["fused"]["SkipSimplifiedLayerNormalization"] == 60  # 30 layers x 2
    quantize = stages["quantize"]
    assert quantize["mode"] == "weight-only" and quantize["bits"] == 8
    assert quantize["quantized_matmuls"] == 121 and quantize["lm_head_quantized"]  # 30 x (qkv, o, gate/up, down) + head
    assert stages["export"]["graph"] == "fused" and manifest["kv"]["share_buffer"]
    quality = manifest["quality"]
    assert 20 < quality["reference_perplexity"] < 40  # SmolLM2-135M on BBC tech prose
    assert quality["perplexity_ratio"] <= 1.02 and quality["top1_agreement"] >= 0.95  # the profile gates
    assert manifest["provenance"]["source"]["format"] == "gguf"
    size = sum(f["size"] for f in manifest["files"].values())
    assert size < 300e6  # int8 weights + fp32 embedding: half the 546 MB fp32 bundle


def test_generate_cli_and_python_api(real_int8_bundle):
    result = subprocess.run(["edgelm", "generate", str(real_int8_bundle), "The capital of France is",
                             "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 0
    code = ("import edgelm_runtime as er, sys; "
            f"print(er.load_bundle({str(real_int8_bundle)!r}).generate('The capital of France is', max_new_tokens=8)); "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'pydantic') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_multi_turn_chat(real_int8_bundle):
    import edgelm_runtime as er

    llm = er.load_bundle(real_int8_bundle, verify=True)
    history = [{"role": "user", "content": "What is the capital of France?"}]  # the plain question (issue 20)
    answer = llm.chat(history, max_new_tokens=16)
    assert "Paris" in answer
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Germany?"}]
    pieces = list(llm.chat_stream(history, max_new_tokens=16))
    assert "Berlin" in "".join(pieces)
    assert llm.last_stats.generated_tokens > 0


def test_chat_command(real_int8_bundle):
    result = subprocess.run(["edgelm", "chat", str(real_int8_bundle), "-n", "16"], input="Say hello.\n/exit\n",
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    assert "bot>" in result.stdout and "tok/s" in result.stdout


def test_zero_shot_sentiment_on_clear_sentences(real_int8_bundle):
    import edgelm_runtime as er

    llm = er.load_bundle(real_int8_bundle)
    sentences = [("I loved this movie, it was wonderful and moving.", "positive"),
                 ("A brilliant, delightful film with a great cast.", "positive"),
                 ("An absolute joy from start to finish.", "positive"),
                 ("Terrible acting and a boring, stupid plot.", "negative"),
                 ("The worst film I have ever seen, a total waste of time.", "negative"),
                 ("Awful. I hated every minute of it.", "negative")]
    predicted = [llm.classify(text, template="sentiment").label for text, _ in sentences]
    assert predicted == [label for _, label in sentences]


ORDER = {"type": "object", "additionalProperties": False, "required": ["customer", "items", "total", "status"],
         "properties": {
             "customer": {"type": "object", "additionalProperties": False, "required": ["name", "city"],
                          "properties": {"name": {"type": "string", "maxLength": 40},
                                         "city": {"type": "string", "maxLength": 40}}},
             "items": {"type": "array", "minItems": 1, "maxItems": 4,
                       "items": {"type": "object", "additionalProperties": False, "required": ["product", "quantity"],
                                 "properties": {"product": {"type": "string", "maxLength": 40},
                                                "quantity": {"type": "integer", "minimum": 1, "maximum": 99}}}},
             "total": {"type": "number", "minimum": 0, "maximum": 100000},
             "status": {"enum": ["new", "paid", "shipped"]}}}


def test_structured_output_validates_20_of_20_at_temperature_0_7(real_int8_bundle):
    """A schema with nested objects, an enum, an array and a number: every sample validates."""
    import jsonschema

    import edgelm_runtime as er

    llm = er.load_bundle(real_int8_bundle)
    ask = [{"role": "user", "content": "Ann Smith from Oslo paid for 2 lamps and 1 desk, 340 euros in all. "
                                       "Write the order as JSON."}]
    outputs = [llm.chat(ask, max_new_tokens=200, temperature=0.7, seed=seed, json_schema=ORDER) for seed in range(20)]
    for text in outputs:
        jsonschema.validate(json.loads(text), ORDER)
    assert sum("Oslo" in json.loads(text)["customer"]["city"] for text in outputs) >= 10  # it reads the prompt too


def test_a_required_tool_call_through_the_server(real_int8_bundle):
    pytest.importorskip("openai")
    from tests.runtime.test_server import openai_client, serving

    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    with serving(real_int8_bundle) as url:
        reply = openai_client(url).chat.completions.create(model="smollm2-int8", messages=[
            {"role": "user", "content": "What is the weather in Paris?"}], tools=[weather], tool_choice="required",
            max_tokens=100)  # the model calls again, the same call: the reply ends there, one call kept
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
