"""Gradient accumulation and 2-process DDP give the update of one batch as large as their global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_support import TINY_MOSAIC

from memory_mosaics.train import TrainConfig, train
from memory_mosaics.train.sampler import WindowSampler

SRC = Path(__file__).resolve().parents[2] / "src"


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def config(**overrides) -> TrainConfig:
    base = {"max_steps": 3, "lr": 1e-2, "warmup_steps": 1, "eval_interval": 3, "eval_batches": 1, "seed": 11}
    return TrainConfig(**{**base, **overrides})


def test_micro_batches_are_fresh_and_tile_the_global_batch(tiny_data):
    from memory_mosaics.data import PreparedData

    tokens = PreparedData.open(tiny_data).split("train")
    accumulated = WindowSampler(tokens, 16, batch_size=2, accum=3, seed=4).batches(step=5)
    big = WindowSampler(tokens, 16, batch_size=6, accum=1, seed=4).batches(step=5)
    assert len(accumulated) == 3
    starts = [tuple(x[:, 0].tolist()) for x, _ in accumulated]
    assert len({tuple(x.flatten().tolist()) for x, _ in accumulated}) == 3, starts  # no micro-batch reused
    assert torch.equal(torch.cat([x for x, _ in accumulated]), big[0][0])
    x, y = big[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one: contiguous windows
    other_step = WindowSampler(tokens, 16, batch_size=6, seed=4).batches(step=6)[0][0]
    assert not torch.equal(other_step, x)


def test_accumulation_equals_one_large_batch(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "acc", config(batch_size=2, grad_accum=3), TINY_MOSAIC, progress=False)
    train(tiny_data, tmp_path / "big", config(batch_size=6), TINY_MOSAIC, progress=False)
    np.testing.assert_allclose(train_losses(tmp_path / "acc"), train_losses(tmp_path / "big"), rtol=1e-5)
    assert_same_weights(weights(tmp_path / "acc"), weights(tmp_path / "big"), atol=1e-6)


def test_global_batch_size_sets_accumulation(tiny_data, tmp_path):
    result = train(tiny_data, tmp_path / "g", config(batch_size=2, global_batch_size=6), TINY_MOSAIC, progress=False)
    run_config = json.loads((tmp_path / "g" / "run_config.json").read_text())
    assert run_config["grad_accum"] == 3 and result.finished


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tiny_data, tmp_path):
    model_flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MOSAIC.items()]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "memory_mosaics.cli", "train", "--data", str(tiny_data), "--out", str(tmp_path / "ddp"),
        "--max-steps=3", "--batch-size=2", "--grad-accum=2", "--lr=1e-2", "--warmup-steps=1",
        "--eval-interval=3", "--eval-batches=2", "--seed=11", "--device=cpu", "--no-progress", *model_flags,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train(
        tiny_data,
        tmp_path / "one",
        config(batch_size=4, grad_accum=2, eval_batches=2),
        TINY_MOSAIC,
        progress=False,
    )
    np.testing.assert_allclose(train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one"), rtol=1e-5)
    assert_same_weights(weights(tmp_path / "ddp"), weights(tmp_path / "one"), atol=1e-5)
    state = json.loads((tmp_path / "ddp" / "checkpoint" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
