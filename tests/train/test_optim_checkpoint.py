"""Weight-decay groups, the learning-rate schedule, and pickle-free optimizer state."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from train_support import TINY_MOSAIC

from memory_mosaics import MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.errors import CheckpointError
from memory_mosaics.train.checkpoint import (
    flatten_optimizer_state,
    resolve_checkpoint,
    unflatten_optimizer_state,
)
from memory_mosaics.train.optim import lr_at, make_optimizer, param_groups


def tiny_model() -> MemoryMosaic:
    torch.manual_seed(0)
    return MemoryMosaic(MemoryMosaicConfig(vocab_size=64, **TINY_MOSAIC))


def test_decay_applies_to_matrices_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and no_decay["params"]
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warmup_cosine_floor():
    kw = {"max_lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "decay_steps": 110}
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.5 * 0.9)  # half way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_at(0, 1.0, 0.1, 0, 100) == 1.0 and not math.isnan(lr_at(5, 1.0, 0.1, 5, 5))


def test_optimizer_state_round_trips_exactly_without_pickle():
    model = tiny_model()
    opt = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    fresh = make_optimizer(tiny_model(), 1e-2, 0.1, (0.9, 0.95))
    fresh.load_state_dict(unflatten_optimizer_state(tensors, meta))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][pid][key]), (pid, key)


def test_resolve_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)
    tiny_model().save_pretrained(tmp_path / "run" / "checkpoint")
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint"
    assert resolve_checkpoint(tmp_path / "run" / "checkpoint") == tmp_path / "run" / "checkpoint"
