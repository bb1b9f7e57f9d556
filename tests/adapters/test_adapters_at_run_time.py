"""Runtime adapters with the rest of the runtime: the prefix cache and `edgelm serve`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

import edgelm_runtime as er

GREEDY = er.SamplingParams(temperature=0.0)


def test_an_adapters_runs_reuse_its_own_cache_only(runtime_bundles, merged_bundles):
    llm, merged = er.load_bundle(runtime_bundles["cpu-fp32"]), er.load_bundle(merged_bundles["tone"])
    tone = llm.with_adapter("tone")
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog", True)
    first = list(tone.generate_tokens(ids, 8, GREEDY))
    longer = ids + first + llm.tokenizer.encode(" and then", False)
    stats: list = []
    assert list(tone.generate_tokens(longer, 8, GREEDY, report=stats.append)) == \
        list(merged.generate_tokens(longer, 8, GREEDY))
    assert stats[0].cached_tokens >= len(ids)  # the adapter's own earlier run
    base: list = []
    list(llm.generate_tokens(longer, 8, GREEDY, report=base.append))
    assert base[0].cached_tokens == 0  # the tone adapter's KV is not the base model's


def test_the_server_serves_each_adapter_by_model_name(runtime_bundles, merged_bundles):
    pytest.importorskip("starlette")
    from tests.runtime.test_server import serving

    bundle = runtime_bundles["cpu-fp32"]
    name = er.read_manifest(bundle).name
    expected = er.load_bundle(merged_bundles["sentiment"]).generate("Once upon a time", max_new_tokens=6)
    with serving(bundle) as url:
        with urllib.request.urlopen(url + "/v1/models") as response:
            listed = [m["id"] for m in json.load(response)["data"]]
        assert listed == [name, f"{name}:sentiment", f"{name}:tone"]
        reply = _complete(url, {"model": f"{name}:sentiment", "prompt": "Once upon a time", "max_tokens": 6,
                                "temperature": 0})
        assert reply["choices"][0]["text"] == expected and reply["model"] == f"{name}:sentiment"
        with pytest.raises(urllib.error.HTTPError) as error:
            _complete(url, {"model": f"{name}:nope", "prompt": "x", "max_tokens": 1})
        body = json.load(error.value)
        assert error.value.code == 404 and f"'{name}:tone'" in body["error"]["message"]


def _complete(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)
