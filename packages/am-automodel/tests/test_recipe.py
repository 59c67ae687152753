"""Recipe validation: every bad value is one line naming the key path, the value, what is accepted."""

from __future__ import annotations

import pytest

from am_automodel.recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    build_recipe,
    load_recipe,
    recipe_help,
)


def _error(raw) -> str:
    with pytest.raises(RecipeError) as info:
        build_recipe(raw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_defaults_are_the_tiny_recipe() -> None:
    recipe = build_recipe({})
    assert recipe.model.preset == "tiny-nemotron-h"
    assert recipe.parallelism.dp_shard == -1 and recipe.tokenizer.path is None


def test_unknown_key_names_path_and_accepted_keys() -> None:
    msg = _error({"optimizer": {"lrr": 1e-3}})
    assert "'optimizer.lrr'" in msg and "did you mean 'lr'" in msg and "'weight_decay'" in msg


def test_misspelled_section() -> None:
    msg = _error({"optimiser": {"lr": 1e-3}})
    assert "unknown section 'optimiser'" in msg and "did you mean 'optimizer'" in msg
    assert "'parallelism'" in msg


def test_wrong_type_and_out_of_range() -> None:
    assert "train.steps = 'ten'" in _error({"train": {"steps": "ten"}})
    msg = _error({"optimizer": {"lr": -1.0}})
    assert "optimizer.lr = -1.0" in msg and "greater than 0" in msg
    assert "parallelism.dp_shard = 0" in _error({"parallelism": {"dp_shard": 0}})
    msg = _error({"optimizer": {"scheduler": "exp"}})
    assert "optimizer.scheduler = 'exp'" in msg and "'cosine'" in msg
    assert "each beta" in _error({"optimizer": {"betas": [0.9, 1.5]}})
    assert "logging.progress = 'yes'" in _error({"logging": {"progress": "yes"}})


def test_model_section_checks() -> None:
    msg = _error({"model": {"preset": "huge"}})
    assert "model.preset = 'huge'" in msg and "tiny-nemotron-h" in msg
    assert "exactly one of model.preset and model.path" in _error(
        {"model": {"preset": "tiny-nemotron-h", "path": "/x"}}
    )
    msg = _error({"model": {"preset": "tiny-nemotron-h", "backend": {"atn": "sdpa"}}})
    assert "model.backend" in msg and "'atn'" in msg and "'attn'" in msg
    msg = _error({"model": {"preset": "tiny-nemotron-h", "backend": {"attn": "nope"}}})
    assert "model.backend" in msg and "nope" in msg


def test_overrides_go_through_the_same_validation(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  steps: 3\n")
    recipe = load_recipe(path, ["--optimizer.lr=1e-4", "--train.steps=7", "--data.shuffle=false"])
    assert recipe.optimizer.lr == 1e-4 and recipe.train.steps == 7 and recipe.data.shuffle is False
    with pytest.raises(RecipeError, match=r"train\.steps = 0"):
        load_recipe(path, ["--train.steps=0"])
    with pytest.raises(RecipeError, match="unknown key 'train.stpes'"):
        load_recipe(path, ["--train.stpes=3"])
    with pytest.raises(RecipeError, match="section.key=value"):
        apply_overrides({}, ["--train"])
    nested = apply_overrides({}, ["--model.backend.attn=eager"])
    assert nested == {"model": {"backend": {"attn": "eager"}}}


def test_bad_files(tmp_path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(bad)


def test_resolved_recipe_round_trips() -> None:
    recipe = build_recipe({"optimizer": {"betas": [0.8, 0.9]}})
    import yaml

    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_help_lists_every_section_and_key() -> None:
    text = recipe_help()
    for name, field in Recipe.model_fields.items():
        assert f"{name}:" in text
        for key in field.annotation.model_fields:
            assert f"{name}.{key} " in text
