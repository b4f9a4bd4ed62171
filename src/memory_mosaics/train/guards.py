"""Numerical faults of a training run: steps with a NaN or infinite loss or gradient.

After the gradients of a step are accumulated, the step's loss and the global
gradient norm are checked (one host sync per step; under torchrun every process takes the same
decision). A step with a NaN or infinite loss or gradient norm is a *fault*:

- no update: the optimizer does not step, so the weights and the AdamW moments (and AdamW's own
  step count) stay exactly as they were; the gradients are dropped;
- the step still counts: its batch is consumed and the step number advances, so the learning-rate
  schedule (a function of the step number), the data order and the checkpoint steps stay the same
  as in a run without the fault;
- it is logged: a `{"kind": "fault", ...}` row in metrics.jsonl and a warning on the
  `memory_mosaics.train` logger;
- after `max_bad_steps` faults in a row the run stops with NumericalFaultError; checkpoints are only
  ever written from weights that no fault touched, so the last one is good.

With float16 the gradient scaler owns infinite gradients (it skips those steps and lowers its scale,
as it is designed to), so there only a non-finite loss counts as a fault.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from memory_mosaics.errors import NumericalFaultError

log = logging.getLogger("memory_mosaics.train")


def grad_norm_and_clip(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients (NaN or inf if any is); clip them to max_norm when > 0."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return torch.nn.utils.get_total_norm(grads)


class FaultCounter:
    """Counts faulty steps and decides when a run must stop."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.total = 0  # faulty steps over the whole run (resumes included)
        self.in_a_row = 0

    def describe(self, loss: float, grad_norm: float, grads_checked: bool) -> str | None:
        """What is wrong with a step whose (process-averaged) loss and grad norm are these, or None."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if grads_checked and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        return None

    def record(self, fault: str | None) -> None:
        if fault is None:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1

    @property
    def must_stop(self) -> bool:
        return self.in_a_row >= self.max_bad_steps

    def state_dict(self) -> dict[str, int]:
        return {"bad_steps": self.total, "bad_steps_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("bad_steps", 0))
        self.in_a_row = int(state.get("bad_steps_in_a_row", 0))

    def stop_error(self, step: int, fault: str, checkpoint: str) -> NumericalFaultError:
        return NumericalFaultError(
            f"training stopped at step {step}: {self.in_a_row} steps in a row had a non-finite loss or "
            f"gradient (last: {fault}); none of them changed the weights, and {checkpoint}; "
            "lower --lr, use --dtype float32, or raise --max-bad-steps"
        )
