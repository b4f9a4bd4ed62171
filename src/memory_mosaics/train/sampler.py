"""Random contiguous windows over a token stream, drawn so that a run can stop and resume exactly.

The windows of optimizer step `s` come from a random generator seeded with `(seed, s)`, not from a
generator that advances as training goes. So the sampler's whole state is the step counter, resuming
is exact by construction, and evaluation never disturbs training data.

Each step draws one *global* batch of `accum * world_size * batch_size` window starts. Micro-step `m`
on process `r` takes rows `[(m * world_size + r) * batch_size, ... + batch_size)`. Two runs with the
same global batch (say 1 process x 2 micro-batches of 4, or 2 processes x 1 micro-batch of 4, or
1 process x 1 batch of 8) therefore see the same windows at every step, which is what makes gradient
accumulation and data parallelism testable against a single large batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from memory_mosaics.errors import MosaicError

_EVAL_STREAM = 0x5EED_E7A1  # a second seed component, so evaluation windows never equal training ones


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs tokens[s : s+T] and targets tokens[s+1 : s+T+1] for every start s, as int64 tensors."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if len(tokens) < seq_len + 1:
        raise MosaicError(
            f"{what} has {len(tokens)} tokens, fewer than one window of {seq_len} + 1; "
            "use a larger corpus or a smaller --seq-len / --block-size"
        )


@dataclass
class WindowSampler:
    tokens: np.ndarray
    seq_len: int
    batch_size: int  # per process, per micro-step
    accum: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    step: int = 0  # the next optimizer step whose batches `next_step()` returns

    def __post_init__(self) -> None:
        check_length(self.tokens, self.seq_len, "the training split")

    @property
    def global_rows(self) -> int:
        return self.accum * self.world_size * self.batch_size

    def global_starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_rows)

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The `accum` fresh micro-batches this process trains on at optimizer step `step`."""
        starts = self.global_starts(step)
        micro = []
        for m in range(self.accum):
            first = (m * self.world_size + self.rank) * self.batch_size
            micro.append(_windows(self.tokens, starts[first : first + self.batch_size], self.seq_len))
        return micro

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        micro = self.batches(self.step)
        self.step += 1
        return micro

    def state_dict(self) -> dict:
        return {
            "kind": "random-windows",
            "seed": self.seed,
            "step": self.step,
            "seq_len": self.seq_len,
            "num_tokens": len(self.tokens),
            "global_rows": self.global_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_tokens": len(self.tokens),
            "global_rows": self.global_rows,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise MosaicError(
                    f"cannot resume exactly: the checkpoint's data sampler had {key}={state.get(key)!r} "
                    f"but this run has {value!r}; resume with the same --data, --seed and batch settings"
                )
        self.step = int(state["step"])


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same fixed random windows at every evaluation (curves stay comparable), split over processes."""
    check_length(tokens, seq_len, "the validation split")
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    starts = rng.integers(0, len(tokens) - seq_len, size=num_batches * batch_size)
    for b in range(rank, num_batches, world_size):
        yield _windows(tokens, starts[b * batch_size : (b + 1) * batch_size], seq_len)
