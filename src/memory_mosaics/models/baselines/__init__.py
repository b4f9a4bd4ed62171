"""Sequence-model baselines (RegBench and other comparisons), each in its own file:

- `rnn.py`   LSTM and GRU language models
- `mamba.py` a selective state-space model (Mamba-style), sequential and chunked scans
- `gla.py`   gated linear attention, recurrent and chunked forms
- `s4d.py`   S4D, convolution (FFT or direct) and recurrent forms

`build_baseline(name, vocab_size, block_size, target_params=None, **overrides)` builds one by
name; with `target_params` it picks the width `n_embd` whose parameter count is closest. Counts
here include the token embedding (a tied head counts once): `model.num_params(non_embedding=False)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memory_mosaics.errors import ConfigError

from .common import BaselineConfig, SequenceLM
from .gla import GLALM, GLAConfig
from .mamba import MambaConfig, MambaLM
from .rnn import RNNLM, RNNConfig
from .s4d import S4DLM, S4DConfig

# name -> (config class, model class, fields the name fixes)
_FAMILIES: dict[str, tuple[type[BaselineConfig], type[SequenceLM], dict[str, Any]]] = {
    "lstm": (RNNConfig, RNNLM, {"cell": "lstm"}),
    "gru": (RNNConfig, RNNLM, {"cell": "gru"}),
    "mamba": (MambaConfig, MambaLM, {}),
    "gla": (GLAConfig, GLALM, {}),
    "s4d": (S4DConfig, S4DLM, {}),
}
BASELINE_NAMES = tuple(_FAMILIES)

# A width whose count misses the target by more than this is an error, not a silent substitute.
MAX_PARAM_MISMATCH = 0.10


def baseline_config(name: str, vocab_size: int, block_size: int, **overrides: Any) -> BaselineConfig:
    """The validated config of baseline `name`; `overrides` are config fields."""
    if name not in _FAMILIES:
        raise ConfigError(f"unknown baseline model {name!r}; known baselines: {', '.join(BASELINE_NAMES)}")
    config_class, _, fixed = _FAMILIES[name]
    clash = sorted(set(fixed) & set(overrides))
    if clash:
        raise ConfigError(f"baseline {name!r} fixes {clash}; use the matching model name instead")
    return config_class.from_dict({"vocab_size": vocab_size, "block_size": block_size, **fixed, **overrides})


def build_baseline(
    name: str, vocab_size: int, block_size: int, target_params: int | None = None, **overrides: Any
) -> nn.Module:
    """Build baseline `name`. With `target_params`, choose `n_embd` so that
    `num_params(non_embedding=False)` is as close as possible to it (other fields, such as
    n_layer, come from `overrides`); the search leaves torch's random stream untouched."""
    if target_params is not None:
        if "n_embd" in overrides:
            raise ConfigError("pass either target_params or n_embd, not both: target_params sets n_embd")
        overrides = {
            **overrides,
            "n_embd": fit_width(name, vocab_size, block_size, target_params, **overrides),
        }
    config = baseline_config(name, vocab_size, block_size, **overrides)
    return _FAMILIES[name][1](config)


def count_params(name: str, vocab_size: int, block_size: int, **overrides: Any) -> int:
    """Parameter count of a baseline, embedding included. Built on the CPU (a model this size
    builds in milliseconds; the meta device's first use costs seconds), without moving the
    caller's random stream."""
    config = baseline_config(name, vocab_size, block_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        return _FAMILIES[name][1](config).num_params(non_embedding=False)


def fit_width(name: str, vocab_size: int, block_size: int, target_params: int, **overrides: Any) -> int:
    """The valid `n_embd` whose parameter count is closest to `target_params`."""
    if not (isinstance(target_params, int) and target_params >= 1):
        raise ConfigError(f"target_params must be a positive integer, got {target_params!r}")

    def first_valid_width(width: int, step: int) -> int:
        """Widths can be constrained (GLA: a multiple of n_head): walk to the nearest valid one."""
        for candidate in range(width, width + 256 * step, step):
            if candidate < 1:
                break
            try:
                baseline_config(name, vocab_size, block_size, **overrides, n_embd=candidate)
                return candidate
            except ConfigError:
                continue
        return 0

    def params_at(width: int) -> int:
        return count_params(name, vocab_size, block_size, **overrides, n_embd=width)

    if first_valid_width(1, 1) == 0:  # e.g. an override that no width can satisfy
        baseline_config(name, vocab_size, block_size, **overrides, n_embd=1)  # raises the real error
    # Parameter counts grow with the width: bisect for the smallest valid width reaching the target.
    low, high = 1, 8
    while params_at(first_valid_width(high, 1)) < target_params:
        low, high = high, high * 2
        if high > 1 << 16:
            raise ConfigError(f"target_params={target_params} needs n_embd > {1 << 16} for {name!r}")
    while low < high:
        middle = (low + high) // 2
        if params_at(first_valid_width(middle, 1)) >= target_params:
            high = middle
        else:
            low = middle + 1
    above = first_valid_width(high, 1)
    below = first_valid_width(above - 1, -1)
    candidates = [w for w in (above, below) if w >= 1]
    best = min(candidates, key=lambda w: abs(params_at(w) - target_params))
    mismatch = abs(params_at(best) - target_params) / target_params
    if mismatch > MAX_PARAM_MISMATCH:
        raise ConfigError(
            f"{name!r} cannot come within {MAX_PARAM_MISMATCH:.0%} of target_params={target_params} "
            f"(closest: n_embd={best} with {params_at(best)} parameters); change n_layer or the target"
        )
    return best


__all__ = [
    "BASELINE_NAMES",
    "GLALM",
    "RNNLM",
    "S4DLM",
    "BaselineConfig",
    "GLAConfig",
    "MambaConfig",
    "MambaLM",
    "RNNConfig",
    "S4DConfig",
    "SequenceLM",
    "baseline_config",
    "build_baseline",
    "count_params",
    "fit_width",
]
