"""Training recipe of the three-moons toy (spec §8): AdamW, linear lr decay, clipped MSE, fresh batches.

The authors trained with MLX 0.9, whose Adam and AdamW omit Adam's bias correction: the first update
is sqrt(1 - beta2) / (1 - beta1) = 0.32 / 0.1, about 3.2 times the learning rate per weight, and the
steps stay about 1.6-3 times larger than bias-corrected ones over the 500 steps (the second-moment
average warms up over ~1000 steps). That is what the recipe's lr 1e-2 was tuned with, and it matters
here: with PyTorch's bias-corrected AdamW the 3-head network settles in a worse solution (docs/moons.md).
So the default is the authors' update; `bias_correction=True` gives `torch.optim.AdamW`.
"""

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
    bias_correction: bool = False  # False: the authors' MLX AdamW; True: torch.optim.AdamW

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


class AdamWithoutBiasCorrection(torch.optim.Optimizer):
    """AdamW as MLX implements it: m and v are exponential averages started at 0 and used as they are.

    w <- w (1 - lr * weight_decay) - lr * m / (sqrt(v) + eps), with m = beta1 m + (1 - beta1) g and
    v = beta2 v + (1 - beta2) g^2 (no division by 1 - beta^t).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ConfigError("AdamWithoutBiasCorrection does not take a closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(param), torch.zeros_like(param)
                state["m"].mul_(beta1).add_(param.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.addcdiv_(state["m"], state["v"].sqrt().add_(group["eps"]), value=-group["lr"])


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
    adam = torch.optim.AdamW if train_config.bias_correction else AdamWithoutBiasCorrection
    optimizer = adam(
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
