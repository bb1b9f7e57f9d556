"""Constrained decoding: what a schema, regex, choice list or grammar allows is all that comes out,
at any seed and temperature, and a constraint that does not compile generates nothing."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from edgelm_runtime import GenerationError

PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "city", "tags", "score"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["Oslo", "Lima", "Quito"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
                         "score": {"type": "number", "minimum": 0, "maximum": 10},
                         "home": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{4}$"}},
                                  "required": ["zip"], "additionalProperties": False}}}


def test_json_schema_output_validates_at_200_seeds_at_temperature_1(llm):
    """The tiny random model writes noise unconstrained; masked, every sample is valid JSON of the schema."""
    for seed in range(200):
        text = llm.generate("Person:", max_new_tokens=400, temperature=1.0, seed=seed, json_schema=PERSON)
        assert llm.last_stats.finish_reason == "eos", (seed, text)  # the grammar completed, nothing cut
        jsonschema.validate(json.loads(text), PERSON)


def test_json_schema_holds_at_every_temperature_and_filter(llm):
    for seed, (temperature, top_k, top_p) in enumerate([(0.0, 0, 1.0), (0.3, 0, 1.0), (1.5, 0, 1.0), (2.0, 0, 1.0),
                                                        (1.0, 5, 1.0), (1.0, 0, 0.5), (1.2, 40, 0.9)] * 3):
        text = llm.generate("Person:", max_new_tokens=400, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=1.3 if seed % 2 else 1.0, seed=seed, json_schema=PERSON)
        assert llm.last_stats.finish_reason == "eos", (seed, text)
        jsonschema.validate(json.loads(text), PERSON)


def test_regex_choices_and_grammar_are_followed_exactly(llm):
    for seed in range(40):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", llm.generate("Code:", temperature=1.0, seed=seed,
                                                                regex=r"[0-9]{3}-[a-z]{2}"))
        assert llm.chat([{"role": "user", "content": "Pick"}], temperature=1.0, seed=seed,
                        choices=["red", "green", "blue sky"]) in {"red", "green", "blue sky"}
        assert llm.generate("Answer:", temperature=1.0, seed=seed,
                            grammar='start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/') in \
            {"yes", "no", *(f"maybe {d}" for d in range(10))}


def test_streaming_gives_the_same_constrained_text(llm):
    whole = llm.generate("Person:", max_new_tokens=200, temperature=0.8, seed=3, json_schema=PERSON)
    pieces = list(llm.generate_stream("Person:", max_new_tokens=200, temperature=0.8, seed=3, json_schema=PERSON))
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_greedy_output_is_unchanged_where_the_grammar_allows_the_models_choice(llm):
    """The mask only removes tokens: a regex that allows anything leaves greedy decoding as it was."""
    free = llm.generate("Once upon", max_new_tokens=12)
    assert llm.generate("Once upon", max_new_tokens=12, regex=r"(?s:.*)") == free


@pytest.mark.parametrize(("constraint", "message"), [
    ({"json_schema": {"type": "nope"}}, "the json_schema does not compile: Invalid type: nope"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema is a list; it must be a JSON schema object"),
    ({"regex": "a(b"}, "the regex does not compile"),
    ({"grammar": "start: undefined_rule"}, "the grammar does not compile"),
    ({"choices": []}, "choices must be a non-empty list of strings"),
    ({"choices": ["a", ""]}, "choices[1] is ''; each choice must be a non-empty string"),
    ({"regex": "a", "choices": ["a"]}, "regex and choices were both given; a generation takes one constraint"),
])
def test_a_constraint_that_does_not_compile_fails_before_any_token(llm, constraint, message):
    """Never fail open (llama.cpp#19051): no unconstrained text, no stats of a run."""
    llm.generate("warm up", max_new_tokens=1)
    llm.last_stats = None
    with pytest.raises(GenerationError, match=re.escape(message)):
        llm.generate_stream("x", **constraint)
    with pytest.raises(GenerationError, match=re.escape(message)):
        llm.chat_stream([{"role": "user", "content": "x"}], **constraint)
    assert llm.last_stats is None  # no model run started


def test_the_constraint_reports_its_cost(llm):
    matcher = llm.constraint(json_schema=PERSON)
    ids = llm.tokenizer.encode("Person:")
    tokens = list(llm.generate_tokens(ids, 200, llm.sampling_params(temperature=1.0, seed=0), matcher))
    assert matcher.finished and matcher.stats.masked_steps == len(tokens)  # the closing brace ends it: no eos step
    assert 0 < matcher.stats.mask_seconds < llm.last_stats.decode_seconds + llm.last_stats.time_to_first_token_s


def test_extract_json_follows_its_keys_at_any_seed(llm):
    """The default extract-json template names its keys (json_keys: fields): the output is that object."""
    template = llm.template("extract-json")
    assert template.json_keys == "fields"
    finished = 0
    for seed in range(20):
        text = llm.complete("extract-json", max_new_tokens=150, sampling=llm.sampling_params(temperature=1.0, seed=seed),
                            fields="name, city", text="Ann Smith moved to Oslo in 2019.")
        if llm.last_stats.finish_reason != "eos":  # the random model's string ran past the tiny context
            assert llm.last_stats.finish_reason in ("max_new_tokens", "max_seq_len")
            continue
        finished += 1
        data = json.loads(text)
        assert set(data) == {"name", "city"} and all(v is None or isinstance(v, str) for v in data.values())
    assert finished >= 10


def test_a_template_json_schema_is_checked_when_the_bundle_loads():
    from edgelm_runtime import TemplateError
    from edgelm_runtime.prompts import template_from_dict

    with pytest.raises(TemplateError, match="json_keys 'names' is not one of its variables"):
        template_from_dict("x", {"kind": "generate", "template": "{text}", "json_keys": "names"})
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert template_from_dict("x", {"kind": "generate", "template": "{text}", "json_schema": schema}).output_schema(
        text="a") == schema
