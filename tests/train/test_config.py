"""Typed configs: flags, YAML and presets are the same names; bad values fail at once with the field."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from memory_mosaics import GPTConfig, MemoryMosaicConfig
from memory_mosaics.commands.train import split_settings
from memory_mosaics.errors import ConfigError
from memory_mosaics.train.config import (
    TrainConfig,
    add_dataclass_flags,
    available_presets,
    build_dataclass,
    load_preset,
    resolve_settings,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    seen: set[str] = set()
    for cls in (TrainConfig, MemoryMosaicConfig, GPTConfig):
        add_dataclass_flags(parser, cls, seen)
    return vars(parser.parse_args(argv))


def test_every_field_is_a_flag_and_only_typed_flags_are_set():
    assert parse([]) == {}
    values = parse(["--n-layer", "3", "--no-bias", "--lr", "1e-2", "--dtype", "bfloat16", "--seq-len", "none"])
    assert values == {"n_layer": 3, "bias": False, "lr": 0.01, "dtype": "bfloat16", "seq_len": None}
    names = {f.name for cls in (TrainConfig, MemoryMosaicConfig, GPTConfig) for f in dataclasses.fields(cls)}
    parser = argparse.ArgumentParser()
    seen: set[str] = set()
    for cls in (TrainConfig, MemoryMosaicConfig, GPTConfig):
        add_dataclass_flags(parser, cls, seen)
    assert seen == names


def test_flag_values_are_checked():
    with pytest.raises(SystemExit):
        parse(["--dtype", "float8"])
    with pytest.raises(SystemExit):
        parse(["--n-layer", "two"])


def test_preset_then_file_then_flags(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("n-layer: 3\nlr: 1e-2\n")  # hyphens are accepted; `1e-2` is read as a float
    settings, origin = resolve_settings("tinystories-cpu", str(file), {"lr": 2e-3})
    assert (
        settings["n_embd"] == load_preset("tinystories-cpu")["n_embd"] and origin["n_embd"] == "preset tinystories-cpu"
    )
    assert settings["n_layer"] == 3 and origin["n_layer"] == str(file)
    assert settings["lr"] == 2e-3 and origin["lr"] == "command line"
    train_values, model_type, model_values = split_settings(settings, origin)
    assert build_dataclass(TrainConfig, train_values, "t").lr == 2e-3
    assert model_type == "mosaic" and model_values["n_layer"] == 3


def test_unknown_and_misplaced_keys_are_refused(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("n_layers: 3\n")
    settings, origin = resolve_settings(None, str(file), {})
    with pytest.raises(ConfigError, match=r"unknown setting 'n_layers'; did you mean 'n_layer'"):
        split_settings(settings, origin)
    with pytest.raises(ConfigError, match="not valid YAML"):
        file.write_text("lr: [1,\n")
        resolve_settings(None, str(file), {})
    with pytest.raises(ConfigError, match="must be float"):
        build_dataclass(TrainConfig, {"lr": "fast"}, "t")
    with pytest.raises(ConfigError, match=r"unknown preset 'tinystories'.*did you mean 'tinystories-cpu'"):
        load_preset("tinystories")


@pytest.mark.parametrize(
    "values,match",
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"max_steps": -1}, "max_steps must be > 0"),
        ({"batch_size": 0}, "batch_size must be > 0"),
        ({"min_lr": 1.0}, "min_lr must be between 0 and lr"),
        ({"beta2": 1.0}, r"beta2 must be in \[0, 1\)"),
        ({"warmup_steps": -5}, "warmup_steps must be >= 0"),
        ({"device": "tpu"}, "device must be"),
    ],
)
def test_train_config_validation(values, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**values)


def test_global_batch_size_and_accumulation():
    assert TrainConfig(batch_size=8, global_batch_size=512).accumulation(world_size=1) == 64
    assert TrainConfig(batch_size=8, global_batch_size=512).accumulation(world_size=8) == 8
    assert TrainConfig(batch_size=4, grad_accum=3).accumulation(world_size=2) == 3
    with pytest.raises(ConfigError, match="not a multiple"):
        TrainConfig(batch_size=6, global_batch_size=512).accumulation(world_size=1)
    with pytest.raises(ConfigError, match="contradicts"):
        TrainConfig(batch_size=8, grad_accum=2, global_batch_size=512).accumulation(world_size=1)


@pytest.mark.parametrize("name", available_presets())
def test_presets_build_valid_configs(name):
    settings = load_preset(name)
    origin = dict.fromkeys(settings, f"preset {name}")
    train_values, model_type, model_values = split_settings(settings, origin)
    config = build_dataclass(TrainConfig, train_values, name)
    model_cls = MemoryMosaicConfig if model_type == "mosaic" else GPTConfig
    model_config = build_dataclass(model_cls, {"vocab_size": 4096, **model_values}, name)
    assert config.max_steps > 0 and model_config.block_size > 0


def test_paper_presets_follow_the_recipe():
    for name in ("babistories-paper", "gpt-babistories-paper"):
        p = load_preset(name)
        assert (p["n_layer"], p["n_embd"], p["n_head"], p["block_size"]) == (12, 768, 12, 512)
        assert p["global_batch_size"] == 512 and p["max_steps"] == 80000 and p["warmup_steps"] == 2000
        assert (float(p["lr"]), float(p["min_lr"]), p["weight_decay"], p["grad_clip"]) == (
            5e-3,
            1e-4,
            0.1,
            1.0,
        )
        assert p["dropout"] == 0.05 and p["dtype"] == "bfloat16"
    assert load_preset("babistories-paper")["pmem_size"] == 2688


def test_configs_folder_mirrors_the_shipped_presets():
    from importlib import resources

    shipped = resources.files("memory_mosaics") / "presets"
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert names == sorted(f"{n}.yaml" for n in available_presets())
    for name in names:
        assert (CONFIGS / name).read_text() == (shipped / name).read_text(), name
