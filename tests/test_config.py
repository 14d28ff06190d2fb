"""Recipes and command-line configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from finetune.tasks import task_class
from finetune.tasks.glue import GLUE_TASKS

from finetune.cli import main
from finetune.config import CONFIG_SECTIONS, parse_run_config, read_recipe, shipped_recipes
from finetune.errors import FinetuneError

RECIPES = shipped_recipes()


def test_a_recipe_for_every_glue_task() -> None:
    assert {f"glue-{task}" for task in GLUE_TASKS} <= set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_shipped_recipe_parses(name: str) -> None:
    document = yaml.safe_load(RECIPES[name].read_text())
    assert set(document) <= set(CONFIG_SECTIONS)
    config = parse_run_config(name)
    flat = read_recipe(RECIPES[name])
    for key, value in flat.items():
        section = next(s for s, cls in CONFIG_SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)})
        parsed = getattr(getattr(config, section), key)
        assert str(parsed) == str(value) or parsed == pytest.approx(float(value)), key
    task = task_class(config.data.task)
    assert config.data.task_name in task.presets or config.data.train_file  # a preset, or local files
    if name.startswith("glue-"):
        assert config.model.model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"


def test_command_line_overrides_recipe_and_types_values() -> None:
    config = parse_run_config("glue-mrpc", ["--learning_rate", "3e-5", "--max_train_samples", "10", "--bf16", "false"])
    assert config.training.learning_rate == 3e-5
    assert config.data.max_train_samples == 10
    assert config.data.task_name == "mrpc"
    assert {"learning_rate", "max_train_samples", "task_name"} <= config.explicit


def test_scientific_notation_from_yaml_is_a_float(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  task_name: rte\ntraining:\n  learning_rate: 2e-5\n")
    assert parse_run_config(str(recipe)).training.learning_rate == 2e-5


def test_help_shows_field_docs(capsys) -> None:
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--model_name_or_path" in text and "Hub id or local path of the pretrained checkpoint" in text
    assert "--max_seq_length" in text and "--learning_rate" in text and "--hub_mirror" in text


def test_recipes_command_lists_names_and_descriptions(capsys) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "glue-mrpc" in out and "MRPC" in out


def test_unknown_recipe_key_is_rejected(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("training:\n  learning_rat: 1e-4\n")
    with pytest.raises(FinetuneError, match="unknown key 'learning_rat'"):
        parse_run_config(str(recipe))


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = parse_run_config("glue-rte", ["--output_dir", str(tmp_path)])
    saved = yaml.safe_load(config.save(tmp_path).read_text())
    assert saved["data"]["task_name"] == "rte"
    assert saved["training"]["learning_rate"] == config.training.learning_rate
    assert saved["model"]["model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
