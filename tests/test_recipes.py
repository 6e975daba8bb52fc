"""Recipes as data: each preset's training recipe is what `diffattn train/paired --preset NAME`
runs, and every flag overrides its field."""
import dataclasses
import math

import pytest

from diffattn import optim
from diffattn.cli import _train_config, build_parser
from diffattn.config import PRESETS, RECIPES, ConfigError, Recipe, TrainConfig, recipe


def train_config(*flags):
    return _train_config(build_parser().parse_args(["paired", "--backend", "numpy", *flags]))


def test_every_preset_has_a_recipe():
    assert set(RECIPES) == set(PRESETS)
    assert PRESETS["stage1-short"] == PRESETS["stage1"]


def test_tiny_recipe_is_readme_command_ones_run():
    # 600 steps of 16 x 64 tokens, lr 3e-3 after 50 warmup steps, cosine to 10%, eval 8 batches every 100
    assert train_config() == TrainConfig(batch_size=16, seq_len=64, grad_accum=1, steps=600, lr=3e-3,
                                         min_lr_ratio=0.1, warmup_steps=50, eval_every=100, eval_batches=8)


def test_stage0_is_diff_mlx_stage0_length_and_context():
    t = train_config("--preset", "stage0")
    assert (t.seq_len, t.batch_size, t.grad_accum) == (1024, 32, 1)
    assert t.steps == math.ceil(100e6 / (32 * 1024)) == 3052
    assert t.lr == 2e-3 and t.warmup_steps == 200 and t.schedule == "cosine"
    assert t.eval_every == 500 and t.eval_batches * 32 * 1024 == 1 << 20


def test_stage1_is_diff_mlx_stage1():
    t = train_config("--preset", "stage1")
    assert (t.seq_len, t.batch_size, t.lr, t.warmup_steps) == (2048, 32, 4e-4, 1000)
    assert t.steps == math.ceil(2e9 / (32 * 2048)) == 30518
    short = train_config("--preset", "stage1-short")
    assert short.steps == math.ceil(RECIPES["stage1-short"].tokens / (32 * 2048)) == 4578
    assert (short.seq_len, short.batch_size, short.lr) == (2048, 32, 4e-4)


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_at_its_own_length_keeps_its_warmup(name):
    # the CLI caps warmup at 10% of a shortened run; no recipe may be capped at its own length
    r = recipe(name)
    assert r.warmup_steps <= r.total_steps // 10
    assert train_config("--preset", name).warmup_steps == r.warmup_steps


def test_flags_override_recipe_fields():
    t = train_config("--preset", "stage0", "--lr", "1e-3", "--tokens", "1e6", "--batch-size", "8",
                     "--eval-tokens", "65536", "--schedule", "linear", "--warmup-steps", "7")
    assert (t.lr, t.batch_size, t.schedule, t.warmup_steps) == (1e-3, 8, "linear", 7)
    assert t.steps == math.ceil(1e6 / (8 * 1024)) and t.eval_batches == 65536 // (8 * 1024)
    # a shortened run: warmup within its first 10%, eval at least at its end
    t = train_config("--preset", "stage0", "--steps", "100")
    assert t.warmup_steps == 10 and t.eval_every == 100


def test_bad_recipes_say_what_is_wrong():
    with pytest.raises(ConfigError, match="steps or tokens"):
        Recipe(seq_len=8, batch_size=1, lr=1e-3, warmup_steps=0, eval_every=1, eval_tokens=8)
    with pytest.raises(ConfigError, match="schedule="):
        Recipe(seq_len=8, batch_size=1, lr=1e-3, warmup_steps=0, eval_every=1, eval_tokens=8, steps=1,
               schedule="step")
    with pytest.raises(ConfigError, match="unknown preset"):
        recipe("stage2")


def test_linear_schedule_by_hand():
    t = TrainConfig(steps=12, lr=1.0, min_lr_ratio=0.1, warmup_steps=2, schedule="linear")
    # warmup 0.5, 1.0; then 1 - 0.9 * (step - 2) / 10 down to 0.1 at step 12
    assert [optim.lr_at(s, t) for s in (0, 1, 2, 7, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1], abs=1e-15)


def test_a_recipe_carries_its_optimizer_and_packing_and_flags_override_them(monkeypatch):
    assert all((r.optimizer, r.packing) == ("adamw", "random") for r in RECIPES.values())
    t = train_config("--preset", "tiny")
    assert (t.optimizer, t.packing) == ("adamw", "random")
    monkeypatch.setitem(RECIPES, "tiny", dataclasses.replace(RECIPES["tiny"], optimizer="muon",
                                                             packing="bos-best-fit"))
    t = train_config("--preset", "tiny")
    assert (t.optimizer, t.packing) == ("muon", "bos-best-fit")
    t = train_config("--preset", "tiny", "--optimizer", "adamw", "--packing", "random")
    assert (t.optimizer, t.packing) == ("adamw", "random")
    with pytest.raises(ConfigError, match="optimizer='sgd'"):
        dataclasses.replace(RECIPES["tiny"], optimizer="sgd")
