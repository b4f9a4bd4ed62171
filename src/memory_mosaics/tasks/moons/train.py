"""Training recipe of the three-moons toy (spec §8): AdamW, linear lr decay, clipped MSE, fresh batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from memory_mosaics.errors import ConfigError, MosaicError
from memory_mosaics.tasks.moons.data import ThreeMoons
from memory_mosaics.tasks.moons.model import MoonsMemory, MoonsModelConfig


@dataclass
class MoonsTrainConfig:
    """The authors' recipe by default: 500 steps of 64 fresh 800-step windows, lr 1e-2 -> 5e-6."""

    steps: int = 500
    batch_size: int = 64
    seq_len: int = 800
    lr: float = 1e-2
    final_lr: float = 5e-6
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    seed: int = 100

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 2)):
            if getattr(self, name) < low:
                raise ConfigError(f"MoonsTrainConfig.{name} must be >= {low}, got {getattr(self, name)}")
        if not (self.lr > 0 and self.final_lr >= 0):
            raise ConfigError(f"MoonsTrainConfig lr must be > 0 and final_lr >= 0, got {self.lr}, {self.final_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"MoonsTrainConfig betas must be in [0, 1), got {self.beta1}, {self.beta2}")

    def to_dict(self) -> dict:
        return asdict(self)


def learning_rate(step: int, config: MoonsTrainConfig) -> float:
    """Linear decay from `lr` at step 0 towards `final_lr` at step `steps`."""
    return config.lr + (config.final_lr - config.lr) * min(step, config.steps) / config.steps


def train_moons(
    model_config: MoonsModelConfig,
    train_config: MoonsTrainConfig,
    data: ThreeMoons,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[MoonsMemory, list[float]]:
    """Train a fresh moons memory; return it and the loss of every step.

    The model's initialisation and the batches both follow `train_config.seed`, so the 1-head and
    the 3-head network see the same batches in the same order.
    """
    torch.manual_seed(train_config.seed)
    model = MoonsMemory(model_config)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train_config.lr,
        betas=(train_config.beta1, train_config.beta2),
        weight_decay=train_config.weight_decay,
    )
    batches = torch.Generator().manual_seed(train_config.seed)
    losses = []
    model.train()
    for step in range(train_config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, train_config)
        x, y = data.sample(train_config.batch_size, train_config.seq_len, batches, split="train")
        _, loss = model(x, y)
        if not torch.isfinite(loss):
            raise MosaicError(f"moons training diverged at step {step} (loss {loss.item()}); try another --seed")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return model, losses
