"""Prompt templates as authored: defaults, recipe additions, --templates files, errors that name
the file and the field."""

from __future__ import annotations

import pytest

from edgelm.api import BuildOverrides, plan_build
from edgelm.config.templates import default_templates, load_templates
from edgelm.errors import ConfigError


def test_defaults_cover_classification_and_free_templates():
    templates = default_templates()
    kinds = {name: spec.kind for name, spec in templates.items()}
    assert kinds["sentiment"] == kinds["topic"] == kinds["yes-no"] == "classify"
    assert kinds["extract-json"] == kinds["summarize"] == kinds["answer"] == "generate"
    assert set(templates["topic"].labels) == {e.label for e in templates["topic"].examples}


def test_recipe_and_templates_file_add_to_the_defaults_by_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("templates:\n  intent:\n    kind: classify\n    query: 'Message: {text}\\nIntent:'\n"
                      "    labels: [order, refund]\n")
    extra = tmp_path / "t.yaml"
    extra.write_text("templates:\n  sentiment:\n    kind: classify\n    query: 'Tweet: {text}\\nMood:'\n"
                     "    labels: [happy, sad]\n")
    plan = plan_build(profile="cpu-fp32", recipe=recipe, overrides=BuildOverrides(templates=load_templates(extra)))
    assert plan.templates["intent"].labels == ("order", "refund")
    assert plan.templates["sentiment"].labels == ("happy", "sad")  # replaced by name
    assert "extract-json" in plan.templates  # defaults kept
    assert plan.summary()["templates"]["intent"]["kind"] == "classify"  # recorded in the manifest's plan


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("templates:\n  x:\n    kind: classify\n    query: 'no text here'\n", r"templates\.x: .*needs a \{text\} placeholder"),
    ("templates:\n  x:\n    kind: generate\n    template: '{a.b}'\n", "not a plain name"),
    ("templates:\n  x:\n    kind: chat\n", r"templates\.x\.kind"),
    ("templates:\n  x:\n    kind: generate\n    template: hi\n    colour: red\n", r"templates\.x\.colour: unknown field"),
    ("templates:\n  x:\n    kind: classify\n    query: '{text}'\n    labels: [a]\n", "two or more distinct labels"),
])
def test_bad_templates_file_names_file_and_field(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as err:
        load_templates(path)
    assert str(path) in err.value.message


def test_missing_templates_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="templates file not found"):
        load_templates(tmp_path / "nope.yaml")
