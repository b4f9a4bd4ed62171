"""Three moons: the toy time series of the paper's section 3 ("predictive disentanglement").

Three moons circle a sun with different periods. We observe the sine and cosine of each moon's
angle, so one time step is a 6-vector `[sin1, cos1, sin2, cos2, sin3, cos3]`. Predicting the
next step is easy for anyone who knows each moon's period; a memory that has to look up "the
last time the sky looked like this" needs the context to span the *joint* period (the least
common multiple of the three), while one memory per moon only needs each moon's own period.

Periods come from {0.5, 1, ..., 3.5} time units. Of the 35 triples we keep the 9 with the smallest
joint period (`35 // 4 + 1`). Ties are broken explicitly: a *stable* sort on the joint period over
the triples in lexicographic order (the order of `itertools.combinations`), so the selection never
depends on a sorting algorithm. This gives, in order (joint period in brackets):

    [0.5, 1, 2] (2), [0.5, 1, 1.5] (3), [0.5, 1, 3] (3), [0.5, 1.5, 3] (3), [1, 1.5, 3] (3),
    [0.5, 1, 2.5] (5), [0.5, 1.5, 2] (6), [0.5, 2, 3] (6), [1, 1.5, 2] (6)

The last one, [1, 1.5, 2], is held out for validation; the other 8 are the training triples.
(The authors' numpy argsort broke the LCM=6 ties differently and held out [1, 2, 3].)

Time runs on a grid of `tokens_per_unit = block_size / max_joint / min_joint_periods`
= 800 / 6 / 3 ≈ 44.44 tokens per time unit, so the longest joint period fits 3 times in a block.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch

from memory_mosaics.errors import ConfigError

PERIOD_CHOICES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5)


def joint_period(periods: tuple[float, ...], precision: float = 0.1) -> float:
    """Least common multiple of the periods, computed on integer multiples of `precision`."""
    ticks = [round(p / precision) for p in periods]
    if any(abs(t * precision - p) > 1e-9 for t, p in zip(ticks, periods, strict=True)):
        raise ConfigError(f"periods {periods} are not multiples of the precision {precision}")
    return math.lcm(*ticks) * precision


def select_triples(
    choices: tuple[float, ...] = PERIOD_CHOICES,
) -> tuple[list[tuple[float, ...]], tuple[float, ...]]:
    """The training triples and the held-out triple, chosen deterministically (see module doc)."""
    candidates = list(itertools.combinations(choices, 3))
    keep = len(candidates) // 4 + 1
    ranked = sorted(candidates, key=joint_period)  # `sorted` is stable: ties keep lexicographic order
    kept = ranked[:keep]
    return kept[:-1], kept[-1]


@dataclass
class MoonsDataConfig:
    """How the three-moons series is laid out.

    block_size: the sequence length the time grid is designed for (the grid fits the longest joint
        period `min_joint_periods` times into it); shorter training sequences are allowed.
    num_points: length of the precomputed series; windows are drawn inside it.
    phase: angle offset added to every moon (radians).
    """

    block_size: int = 800
    min_joint_periods: int = 3
    num_points: int = 10_000
    phase: float = 0.3

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ConfigError(f"MoonsDataConfig.block_size must be >= 2, got {self.block_size}")
        if self.min_joint_periods < 1:
            raise ConfigError(f"MoonsDataConfig.min_joint_periods must be >= 1, got {self.min_joint_periods}")
        if self.num_points < 2 * self.block_size + 2:
            raise ConfigError(
                f"MoonsDataConfig.num_points must be >= 2*block_size+2 = {2 * self.block_size + 2}, "
                f"got {self.num_points}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class ThreeMoons:
    """The series for every selected triple, and random windows `(x, y)` with `y` = `x` shifted by one."""

    def __init__(self, config: MoonsDataConfig | None = None):
        self.config = config or MoonsDataConfig()
        self.train_triples, self.val_triple = select_triples()
        max_joint = max(joint_period(p) for p in [*self.train_triples, self.val_triple])
        self.tokens_per_unit = self.config.block_size / max_joint / self.config.min_joint_periods
        if self.tokens_per_unit < 4:
            raise ConfigError(
                f"block_size {self.config.block_size} gives {self.tokens_per_unit:.2f} tokens per time "
                "unit; at least 4 are needed to sample the fastest moon"
            )
        self.time = torch.arange(self.config.num_points, dtype=torch.float64) / self.tokens_per_unit
        self._train_series = torch.stack([self.series(p) for p in self.train_triples])

    def angles(self, periods: tuple[float, ...]) -> torch.Tensor:
        """Each moon's angle (radians) at every point of the series, shape (num_points, 3), float64."""
        return 2 * math.pi * self.time[:, None] / torch.tensor(periods, dtype=torch.float64) + self.config.phase

    def series(self, periods: tuple[float, ...]) -> torch.Tensor:
        """The whole series for one triple, shape (num_points, 6), float32."""
        angles = self.angles(periods)
        pairs = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1)  # (N, 3, 2)
        return pairs.reshape(len(self.time), 2 * len(periods)).float()

    def period_tokens(self, periods: tuple[float, ...]) -> tuple[list[float], float]:
        """Each moon's period and the joint period, in tokens."""
        return [p * self.tokens_per_unit for p in periods], joint_period(periods) * self.tokens_per_unit

    def windows(
        self, periods: tuple[float, ...], starts: torch.Tensor, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows of one triple at the given start indices: x (B, seq_len, 6) and y = next steps."""
        data = self.series(periods)
        index = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        chunk = data[index]
        return chunk[:, :-1], chunk[:, 1:]

    def sample(
        self, batch_size: int, seq_len: int, generator: torch.Generator, split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of random windows; each row picks a random triple of the split and a random start."""
        if split not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
        if not 1 <= seq_len <= self.config.block_size:
            raise ConfigError(f"seq_len must be in [1, {self.config.block_size}], got {seq_len}")
        series = self._train_series if split == "train" else self.series(self.val_triple)[None]
        which = torch.randint(len(series), (batch_size,), generator=generator)
        high = self.config.num_points - 2 * self.config.block_size - 1
        starts = torch.randint(high, (batch_size,), generator=generator)
        index = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        chunk = series[which[:, None], index]
        return chunk[:, :-1], chunk[:, 1:]
