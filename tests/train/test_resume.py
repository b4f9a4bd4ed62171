"""Stopping with stop_at and resuming lands on exactly the losses of a run that never stopped."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from train_support import TINY_GPT, TINY_MOSAIC

from memory_mosaics.train import TrainConfig, train


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("model,shape", [("mosaic", TINY_MOSAIC), ("gpt", TINY_GPT)])
def test_resume_is_bitwise_identical(tiny_data, tmp_path, model, shape):
    # dropout on, so the restored random-generator state matters too
    shape = {**shape, "dropout": 0.1}
    config = TrainConfig(
        model=model,
        max_steps=7,
        batch_size=2,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=3,
        eval_batches=2,
        seed=5,
    )
    full = train(tiny_data, tmp_path / "full", config, shape, progress=False)
    stopped = train(tiny_data, tmp_path / "part", config, shape, stop_at=4, progress=False)
    assert stopped.step == 4 and not stopped.finished
    resumed = train(tiny_data, tmp_path / "part", config, shape, resume=True, progress=False)
    assert full.finished and resumed.finished and resumed.step == 7

    uninterrupted, continued = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(continued) == list(range(1, 8))  # one row per step, none duplicated by the resume
    for step in range(1, 8):
        assert continued[step] == uninterrupted[step], f"step {step} differs after resume"
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def test_resume_with_changed_settings_is_refused(tiny_data, tmp_path):
    from memory_mosaics.errors import ConfigError

    config = TrainConfig(max_steps=4, batch_size=2, eval_interval=2, eval_batches=1)
    train(tiny_data, tmp_path / "run", config, TINY_MOSAIC, stop_at=2, progress=False)
    changed = TrainConfig(max_steps=4, batch_size=2, eval_interval=2, eval_batches=1, lr=5e-3)
    with pytest.raises(ConfigError, match="lr"):
        train(tiny_data, tmp_path / "run", changed, TINY_MOSAIC, resume=True, progress=False)
    with pytest.raises(ConfigError, match="n_embd"):
        train(tiny_data, tmp_path / "run", config, {**TINY_MOSAIC, "n_embd": 32}, resume=True, progress=False)
