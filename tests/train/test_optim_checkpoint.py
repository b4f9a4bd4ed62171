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


def test_the_optimizer_is_fused_where_torch_has_it_and_steps_like_the_plain_one():
    """On CPUs torch >= 2.4 has a fused AdamW (one kernel per step instead of a dozen operations per
    tensor); make_optimizer takes it, and its steps match torch's default implementation."""
    fused_model, plain_model = tiny_model(), tiny_model()
    plain_model.load_state_dict(fused_model.state_dict())
    fused = make_optimizer(fused_model, 1e-2, 0.1, (0.9, 0.95))
    plain = torch.optim.AdamW(param_groups(plain_model, 0.1), lr=1e-2, betas=(0.9, 0.95))
    assert fused.defaults["fused"] is (torch.torch_version.TorchVersion(torch.__version__) >= "2.4")
    x = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            model(x, x)[1].backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
