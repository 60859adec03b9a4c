"""Recipes (recipes/*.json, cited by docs/training.md) and config.json's preprocessing defaults: none of this needs
timm, so a timm import break fails test_timm.py without hiding these."""

from __future__ import annotations

import json

import pytest
from imgclf import config, preprocessing
from imgclf.search.results import load_hyperparameters

from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.json"))


def test_there_are_recipes():
    assert len(RECIPES) >= 3, RECIPES  # the parametrized tests below would otherwise pass on none


def test_old_model_dirs_get_the_default_preprocessing():
    """config.json written before the preprocessing fields: bilinear, torchvision's 256/224 resize."""
    prep = preprocessing.Preprocessing.from_config({
        "image_size": 64, "resize_size": preprocessing.resize_size(64), "mean": list(preprocessing.IMAGENET_MEAN),
        "std": list(preprocessing.IMAGENET_STD)})
    assert prep == preprocessing.Preprocessing(64) and prep.resize_size == preprocessing.resize_size(64) == 73


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_validate(recipe):
    hp = config.parse_hyperparameters(load_hyperparameters(recipe))
    assert hp.model


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_local_train_reads_recipes(recipe, tmp_path, monkeypatch):
    """docs/training.md's `python -m imgclf.local train --data D --output O --hyperparameters recipes/X.json`: the
    command line parses, and the file's values reach the training run as --hp strings (--hp overrides one)."""
    from imgclf import local

    runs = []
    monkeypatch.setattr(local, "train", lambda *args: runs.append(args) or 0)  # the run itself: test_train.py
    argv = ["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
            "--hyperparameters", str(recipe), "--hp", "epochs=1"]
    assert local.main(argv) == 0
    [(data_dir, output, hps, weights)] = runs
    assert (data_dir, output, weights) == (tmp_path / "data", tmp_path / "out", None)
    recipe_values = json.loads(recipe.read_text())["hyperparameters"]
    assert hps == {**local.hyperparameters_file(recipe), "epochs": "1"}
    assert hps["model"] == recipe_values["model"] and set(hps) == set(recipe_values) | {"epochs"}
    assert all(isinstance(v, str) for v in hps.values())
    config.parse_hyperparameters(hps)
