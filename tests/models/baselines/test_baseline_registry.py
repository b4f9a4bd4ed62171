"""The registry: names, errors that speak to the user, and parameter-matched widths."""

import pytest
import torch

from memory_mosaics.errors import ConfigError
from memory_mosaics.models.baselines import (
    BASELINE_NAMES,
    GLAConfig,
    MambaConfig,
    RNNConfig,
    S4DConfig,
    baseline_config,
    build_baseline,
    count_params,
)

# RegBench's Memory Mosaic (2 layers, d=128, vocabulary 20): 2 x 196,920 + 20 x 128 parameters.
REGBENCH_MOSAIC_PARAMS = 2 * 196_920 + 20 * 128


def test_names():
    assert BASELINE_NAMES == ("lstm", "gru", "mamba", "gla", "s4d")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown baseline model 'rwkv'.*lstm, gru, mamba, gla, s4d"):
        build_baseline("rwkv", 20, 64)


@pytest.mark.parametrize("name", BASELINE_NAMES)
@pytest.mark.parametrize("target", [REGBENCH_MOSAIC_PARAMS, 60_000])
def test_target_params_is_met_within_three_percent(name, target):
    model = build_baseline(name, 20, 1000, target_params=target)
    params = model.num_params(non_embedding=False)
    assert params == sum(p.numel() for p in model.parameters())
    assert abs(params - target) / target < 0.03, (name, model.config.n_embd)


def test_target_params_keeps_other_overrides():
    model = build_baseline("mamba", 20, 1000, target_params=100_000, n_layer=3, d_state=8)
    assert model.config.n_layer == 3 and model.config.d_state == 8
    assert abs(model.num_params(non_embedding=False) - 100_000) / 100_000 < 0.03


def test_fitting_the_width_does_not_move_the_random_stream():
    torch.manual_seed(0)
    fitted = build_baseline("gla", 20, 64, target_params=50_000)
    torch.manual_seed(0)
    direct = build_baseline("gla", 20, 64, n_embd=fitted.config.n_embd)
    for (name, a), b in zip(fitted.state_dict().items(), direct.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_target_params_and_n_embd_conflict():
    with pytest.raises(ConfigError, match="either target_params or n_embd"):
        build_baseline("lstm", 20, 64, target_params=10_000, n_embd=32)


def test_unreachable_target_is_an_error_not_a_silent_substitute():
    with pytest.raises(ConfigError, match="cannot come within"):
        build_baseline("gla", 20, 64, target_params=50, n_layer=2)


def test_count_params_agrees_with_the_built_model():
    model = build_baseline("s4d", 20, 64, n_embd=24)
    assert count_params("s4d", 20, 64, n_embd=24) == model.num_params(non_embedding=False)
    assert model.num_params() == model.num_params(non_embedding=False) - 20 * 24


def test_the_name_fixes_the_cell():
    assert build_baseline("gru", 20, 64).config.cell == "gru"
    with pytest.raises(ConfigError, match="fixes \\['cell'\\]"):
        build_baseline("lstm", 20, 64, cell="gru")


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"unknown field.*n_heads"):
        baseline_config("gla", 20, 64, n_heads=4)


@pytest.mark.parametrize(
    ("config_class", "fields", "bad_field"),
    [
        (RNNConfig, {"n_layer": 0}, "n_layer"),
        (RNNConfig, {"cell": "rnn"}, "cell"),
        (RNNConfig, {"dropout": 1.0}, "dropout"),
        (MambaConfig, {"d_state": 0}, "d_state"),
        (MambaConfig, {"scan": "fast"}, "scan"),
        (MambaConfig, {"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
        (GLAConfig, {"n_embd": 30, "n_head": 4}, "n_embd"),
        (GLAConfig, {"key_dim": 6, "n_head": 4}, "key_dim"),
        (S4DConfig, {"d_state": 7}, "d_state"),
        (S4DConfig, {"form": "fourier"}, "form"),
    ],
)
def test_bad_values_name_the_field(config_class, fields, bad_field):
    with pytest.raises(ConfigError, match=f"{config_class.__name__}.{bad_field} must be"):
        config_class(vocab_size=20, block_size=64, **fields)


def test_config_round_trips_through_a_dict():
    config = MambaConfig(vocab_size=20, block_size=64, n_embd=40)
    assert config.dt_rank == 3
    assert MambaConfig.from_dict(config.to_dict()) == config
