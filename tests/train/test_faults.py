"""NaN/inf faults injected into training: the step is skipped (weights and AdamW untouched), logged,
counted, and too many in a row stop the run with the last good checkpoint intact."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from train_support import TINY_MOSAIC

from memory_mosaics import MemoryMosaic
from memory_mosaics.cli import main
from memory_mosaics.errors import NumericalFaultError
from memory_mosaics.train import TrainConfig, Trainer
from memory_mosaics.train.checkpoint import read_trainer_state


class InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Poisoned(torch.nn.Module):
    """Wraps the trainer's model: at the chosen steps (1-based) the loss or the gradient is non-finite.
    Also keeps a copy of the weights and AdamW state as they were when each step began."""

    def __init__(self, trainer: Trainer, bad_loss=(), bad_grad=()):
        super().__init__()
        self.trainer, self.model = trainer, trainer.model
        self.bad_loss, self.bad_grad = set(bad_loss), set(bad_grad)
        self.before: dict[int, tuple[dict, dict]] = {}

    def forward(self, x, y):
        step = self.trainer.step + 1
        weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        moments = {(i, k): v.clone() for i, s in self.trainer.optimizer.state.items() for k, v in s.items()}
        self.before[step] = (weights, moments)
        logits, loss = self.model(x, y)
        if step in self.bad_loss:
            loss = loss * float("nan")
        if step in self.bad_grad:
            loss = InfGradient.apply(loss)
        return logits, loss


def make_trainer(data, out, bad_loss=(), bad_grad=(), **settings) -> tuple[Trainer, Poisoned]:
    config = TrainConfig(
        max_steps=8, batch_size=2, lr=3e-3, warmup_steps=2, eval_interval=4, eval_batches=1, seed=3, **settings
    )
    trainer = Trainer(data, out, config, TINY_MOSAIC, progress=False)
    trainer.train_model = Poisoned(trainer, bad_loss, bad_grad)
    return trainer, trainer.train_model


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_faulty_step_changes_no_weight_and_is_logged(tiny_data, tmp_path, caplog):
    trainer, poison = make_trainer(tiny_data, tmp_path / "run", bad_loss={3}, bad_grad={4})
    with caplog.at_level(logging.WARNING, logger="memory_mosaics.train"):
        result = trainer.run()
    assert result.finished and result.step == 8
    # weights and AdamW moments when step 5 began are those after step 2: steps 3 and 4 did nothing
    assert same(poison.before[3][0], poison.before[5][0]) and same(poison.before[3][1], poison.before[5][1])
    assert not same(poison.before[2][0], poison.before[3][0])  # a good step does change them
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {6}  # AdamW counted the 6 good steps only

    metrics = rows(tmp_path / "run")
    faults = [r for r in metrics if r["kind"] == "fault"]
    assert [(r["step"], r["fault"].split(" is ")[0]) for r in faults] == [(3, "loss"), (4, "gradient norm")]
    assert [r["bad_steps_in_a_row"] for r in faults] == [1, 2]
    assert [r["step"] for r in metrics if r["kind"] == "train"] == [1, 2, 5, 6, 7, 8]
    assert all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in metrics if r["kind"] == "train")
    assert [m for m in caplog.messages if "skipped" in m] == [
        "step 3 skipped: loss is nan (1 in a row, 1 in all; the run stops at 5 in a row)",
        "step 4 skipped: gradient norm is nan (2 in a row, 2 in all; the run stops at 5 in a row)",
    ]
    state = read_trainer_state(tmp_path / "run" / "checkpoint")
    assert state["bad_steps"] == 2 and state["bad_steps_in_a_row"] == 0


def test_faults_that_do_not_come_in_a_row_never_stop_the_run(tiny_data, tmp_path):
    trainer, _ = make_trainer(tiny_data, tmp_path / "run", bad_loss={2, 4, 6, 8}, max_bad_steps=2)
    result = trainer.run()
    assert result.finished and trainer.faults.total == 4


def test_k_faults_in_a_row_stop_with_the_last_good_checkpoint_intact(tiny_data, tmp_path):
    run = tmp_path / "run"
    trainer, poison = make_trainer(tiny_data, run, bad_loss=range(5, 9), max_bad_steps=3, ckpt_interval=2)
    with pytest.raises(NumericalFaultError) as err:
        trainer.run()
    message = str(err.value)
    assert "stopped at step 7: 3 steps in a row" in message and "loss is nan" in message
    assert f"the last checkpoint {run / 'checkpoint'} (step 6) is intact" in message
    # the step-6 checkpoint holds the weights of step 4, the last good update
    saved = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert same(saved, {k: v for k, v in poison.before[5][0].items() if k in saved})
    assert MemoryMosaic.from_pretrained(run / "checkpoint") is not None
    assert [r["step"] for r in rows(run) if r["kind"] == "fault"] == [5, 6, 7]


def test_the_cli_stops_with_one_error_line_and_exit_2(tiny_data, tmp_path, capsys, monkeypatch):
    forward = MemoryMosaic.forward

    def nan_forward(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        return logits, None if loss is None else loss * float("nan")

    monkeypatch.setattr(MemoryMosaic, "forward", nan_forward)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MOSAIC.items()]
    argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--max-steps=6", "--batch-size=2"]
    assert main([*argv, *flags, "--max-bad-steps=2", "--eval-batches=1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mosaic train: error: training stopped at step 2: 2 steps in a row")
    assert "no checkpoint was written yet" in err[0]
