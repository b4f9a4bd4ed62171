"""RegBench training protocol: train on the train DFAs' prompts, keep the checkpoint with the best
validation loss, and score it on the test DFAs.

The benchmark's protocol (seq_icl `dfa/base`): batch 32, AdamW (betas 0.9/0.999, weight decay
0.1, lr 5e-4), gradient clipping at 1.0, a linear warm-up from 1e-6 over the first 10 % of the
steps then a cosine decay to 0.1 × lr, cross-entropy over letter targets only (separator and pad
targets are ignored), validation once per epoch, and the best-val-loss checkpoint evaluated on
test. Its budget is 200 epochs; `TrainConfig.epochs` or `.steps` sets a smaller one for CPUs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memory_mosaics.errors import ConfigError
from memory_mosaics.tasks.regbench.data import IGNORE, Prompt, RegBenchSplits, make_batch
from memory_mosaics.tasks.regbench.metrics import MetricSums, next_symbol_masks, score_logits
from memory_mosaics.tasks.regbench.models import build_model, count_params
from memory_mosaics.train.optim import adamw, param_groups

# Longest input the benchmark's generator can make: 19 strings of 49 letters and 18 separators.
DEFAULT_BLOCK_SIZE = 1024


@dataclass
class TrainConfig:
    """One training run. Exactly one budget applies: `steps` if set, else `epochs`."""

    epochs: float = 200.0
    steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    warmup_init_lr: float = 1e-6
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    num_evals: int | None = None  # validation passes; None = once per epoch (the benchmark's)
    max_len: int | None = None  # crop prompts to this many tokens (None = whole prompts)
    dtype: str = "bfloat16"  # autocast dtype on CPU/GPU; "float32" disables autocast
    eval_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs > 0, "> 0"),
            ("steps", self.steps is None or self.steps >= 1, "None or >= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_frac", 0 <= self.warmup_frac < 1, "in [0, 1)"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 disables clipping)"),
            ("num_evals", self.num_evals is None or self.num_evals >= 1, "None or >= 1"),
            ("max_len", self.max_len is None or self.max_len >= 2, "None or >= 2"),
            ("dtype", self.dtype in ("bfloat16", "float32"), "bfloat16 or float32"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
        ]
        for field, ok, expected in checks:
            if not ok:
                raise ConfigError(f"TrainConfig.{field} = {getattr(self, field)!r}: expected {expected}")

    def total_steps(self, num_train: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * math.ceil(num_train / self.batch_size)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    model: str
    params: int
    accuracy: float
    tvd: float
    test_loss: float
    best_val_loss: float
    best_step: int
    steps: int
    seconds: float
    cpu_seconds: float  # process CPU time: about seconds x cores on an otherwise idle machine


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up from `warmup_init_lr` to `lr`, then cosine decay to `min_lr_ratio`·lr."""
    warmup = int(config.warmup_frac * total)
    if step < warmup:
        return config.warmup_init_lr + (config.lr - config.warmup_init_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    low = config.min_lr_ratio * config.lr
    return low + 0.5 * (config.lr - low) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays matrices and embeddings but not biases, norms and per-head scalars (the trainer's
    groups), with RegBench's betas."""
    return adamw(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.999))


def _autocast(config: TrainConfig, device: torch.device):
    if config.dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction=reduction,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, prompts: list[Prompt], config: TrainConfig, device: torch.device, masks=None
) -> tuple[float, MetricSums]:
    """Mean loss over letter targets, and the accuracy/TVD sums, of `model` on `prompts`."""
    was_training = model.training
    model.eval()
    masks = masks or [next_symbol_masks(p, config.max_len) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].tokens))  # less padding
    loss_sum, count, sums = 0.0, 0, MetricSums()
    for start in range(0, len(order), config.eval_batch_size):
        chunk = order[start : start + config.eval_batch_size]
        idx, targets = make_batch([prompts[i] for i in chunk], config.max_len)
        idx, targets = idx.to(device), targets.to(device)
        with _autocast(config, device):
            logits, _ = model(idx)
        loss_sum += _loss(logits, targets, reduction="sum").item()
        count += int((targets != IGNORE).sum().item())
        sums.add(score_logits(logits.cpu(), [masks[i] for i in chunk]))
    model.train(was_training)
    return loss_sum / max(count, 1), sums


def train_and_test(
    model: nn.Module,
    splits: RegBenchSplits,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int, float], None] | None = None,
) -> RunResult:
    """Train `model` on `splits.train`, keep the best-val-loss weights, score them on test.

    `on_step(step, total, loss)` is called after each optimiser step (for progress bars).
    """
    device = torch.device(device)
    model.to(device).train()
    started, cpu_started = time.perf_counter(), time.process_time()
    optimizer = make_optimizer(model, config)
    total = config.total_steps(len(splits.train))
    steps_per_epoch = math.ceil(len(splits.train) / config.batch_size)
    evals = config.num_evals or max(1, total // steps_per_epoch)
    eval_at = {round(total * (i + 1) / evals) for i in range(evals)}
    val_masks = [next_symbol_masks(p, config.max_len) for p in splits.val]
    shuffler = torch.Generator().manual_seed(config.seed)
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    batches: list[list[int]] = []
    for step in range(1, total + 1):
        if not batches:  # a new epoch: reshuffle, keep the last partial batch
            perm = torch.randperm(len(splits.train), generator=shuffler).tolist()
            batches = [perm[i : i + config.batch_size] for i in range(0, len(perm), config.batch_size)]
        idx, targets = make_batch([splits.train[i] for i in batches.pop(0)], config.max_len)
        idx, targets = idx.to(device), targets.to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, total, config)
        with _autocast(config, device):
            logits, _ = model(idx)
        loss = _loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if on_step is not None:
            on_step(step, total, loss.item())
        if step in eval_at:
            val_loss, _ = evaluate(model, splits.val, config, device, val_masks)
            if val_loss < best[0]:
                best = (val_loss, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    test_loss, sums = evaluate(model, splits.test, config, device)
    return RunResult(
        model=type(model).__name__,
        params=count_params(model),
        accuracy=sums.accuracy,
        tvd=sums.tvd,
        test_loss=test_loss,
        best_val_loss=best[0],
        best_step=best[1],
        steps=total,
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
    )


def run_model(
    name: str,
    splits: RegBenchSplits,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int, float], None] | None = None,
    **overrides,
) -> RunResult:
    """Build the registered model `name` (seeded by `config.seed`), train it and test it."""
    # A fixed block keeps the models (and their random initialisation) independent of the data.
    block_size = config.max_len or DEFAULT_BLOCK_SIZE
    longest = max(len(p.tokens[: config.max_len]) for p in splits.train + splits.val + splits.test)
    if longest > block_size + 1:
        raise ConfigError(f"prompts of {longest} tokens exceed the block of {block_size}; set TrainConfig.max_len")
    torch.manual_seed(config.seed)
    model = build_model(name, block_size, **overrides)
    result = train_and_test(model, splits, config, device, on_step)
    result.model = name
    return result
