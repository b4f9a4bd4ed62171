"""The training loop: windows -> micro-batches -> AdamW step, with evaluation, logging and checkpoints.

`train(...)` checks everything it can (data, configs, output folder, model size; see checks.py)
before it writes a byte, so bad input leaves nothing behind. A run folder then holds:

    metrics.jsonl       one JSON object per logged step: {"kind": "train", "step", "loss", "lr", ...}
                        and one per evaluation: {"kind": "val", "step", "val_loss", "val_perplexity"}
                        and one per skipped step: {"kind": "fault", "step", "fault", "bad_steps", ...}
    loss.png            training and validation loss against step, redrawn at each evaluation
    run_config.json     the resolved training and model configs, and the data folder
    checkpoint/         the latest checkpoint (see checkpoint.py)

Resuming restores weights, AdamW moments, generator states and the sampler's step, so a run stopped
with `stop_at` (or killed) and resumed lands on the same losses as one that never stopped (bitwise on
CPU float32). A run killed before its first checkpoint starts again from step 0 on `--resume`.
Steps with a NaN or infinite loss or gradient are skipped, logged, and stop the run when too many
come in a row (see guards.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from memory_mosaics.errors import CheckpointError, ConfigError, MosaicError
from memory_mosaics.train import checkpoint as ckpt
from memory_mosaics.train import distributed as distrib
from memory_mosaics.train.checks import (
    build_model_config,
    check_fits_in_memory,
    check_new_run_dir,
    check_resume_settings,
    check_seq_len,
    make_run_dir,
    model_classes,
)
from memory_mosaics.train.config import TrainConfig
from memory_mosaics.train.guards import FaultCounter, grad_norm_and_clip, log
from memory_mosaics.train.optim import lr_at, make_optimizer, set_lr
from memory_mosaics.train.sampler import WindowSampler, check_length, eval_batches


def autocast_context(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers (what gets saved and evaluated)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _row_step(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    finished: bool  # reached max_steps (False when stopped by stop_at)
    last_loss: float | None = None
    last_val_loss: float | None = None
    tokens_per_s: float | None = None
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """One training run on one process (of possibly several under torchrun)."""

    def __init__(
        self,
        data_dir: str | Path,
        out: str | Path,
        config: TrainConfig,
        model_settings: dict[str, Any] | None = None,
        resume: bool = False,
        stop_at: int | None = None,
        progress: bool = True,
    ):
        from memory_mosaics.data import PreparedData

        self.config, self.out, self.progress = config, Path(out), progress
        self.model_settings = dict(model_settings or {})
        self.ctx, self.device = distrib.setup(config.device)
        self.data = PreparedData.open(data_dir)
        self.data_dir = str(data_dir)
        self.train_tokens, self.val_tokens = self.data.split("train"), self.data.split("val")
        self.resuming = resume
        self.resume_from = self._prepare_resume() if resume else None
        if self.resume_from is None:
            if not resume:
                check_new_run_dir(self.out)
                self.model_config = build_model_config(config.model, self.model_settings, self.data.vocab_size)
            else:  # killed before its first checkpoint: start again, with the model it was started with
                self.model_config = self._restart_model_config()
        self.seq_len = config.seq_len or self.model_config.block_size
        check_seq_len(self.seq_len, self.model_config.block_size)
        check_length(self.train_tokens, self.seq_len, f"the training split of {data_dir}")
        check_length(self.val_tokens, self.seq_len, f"the validation split of {data_dir}")
        self.accum = config.accumulation(self.ctx.world_size)
        if stop_at is not None and stop_at <= 0:
            raise ConfigError(f"--stop-at must be > 0, got {stop_at}")
        self.stop_at = stop_at
        # Every process checks the output folder before the first one creates it.
        distrib.barrier(self.ctx)
        self._build()

    def _prepare_resume(self) -> Path | None:
        folder = ckpt.find_resumable(self.out)
        if folder is None:
            return None
        state = ckpt.read_trainer_state(folder)
        try:
            saved = TrainConfig.from_dict(state["train_config"])
        except (KeyError, ConfigError) as err:
            raise CheckpointError(f"{folder / ckpt.STATE_FILE} has no valid train_config ({err})") from None
        self.resumed_model = ckpt.load_model(folder)
        self.model_config = self.resumed_model.config
        check_resume_settings(saved, self.config, self.model_settings, self.model_config.to_dict())
        saved_fp = state.get("data", {}).get("tokenizer_fingerprint")
        if saved_fp != self.data.tokenizer.fingerprint():
            raise MosaicError(
                f"--data {self.data_dir} was tokenized with {self.data.tokenizer.name} "
                f"({self.data.tokenizer.fingerprint()[:12]}) but the run was trained on data with tokenizer "
                f"{str(saved_fp)[:12]}; resume with the original --data"
            )
        self.saved_state = state
        return folder

    def _restart_model_config(self):
        """The model config in run_config.json, after checking the settings given now against it."""
        path = self.out / ckpt.RUN_CONFIG
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            train_config = TrainConfig.from_dict(saved["train_config"])
            model_values = dict(saved["model_config"])
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(
                f"cannot resume: {path} is corrupt ({err}); start a new run with another --out"
            ) from None
        check_resume_settings(train_config, self.config, self.model_settings, model_values)
        return build_model_config(self.config.model, model_values, self.data.vocab_size)

    def _build(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # same initial weights on every process
        model_cls, _ = model_classes(cfg.model)
        if self.resume_from is not None:
            self.model = self.resumed_model.to(self.device)
        else:
            check_fits_in_memory(self.model_config, self.device)
            self.model = model_cls(self.model_config).to(self.device)
        self.faults = FaultCounter(cfg.max_bad_steps)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "float16")
        self.sampler = WindowSampler(
            self.train_tokens, self.seq_len, cfg.batch_size, self.accum,
            self.ctx.world_size, self.ctx.rank, cfg.seed,
        )  # fmt: skip
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        torch.manual_seed(cfg.seed + 1 + self.ctx.rank)  # dropout differs between processes
        if self.resume_from is not None:
            self._restore(self.saved_state)
        self.train_model: nn.Module = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.model)
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)

    def _restore(self, state: dict) -> None:
        try:
            self._restore_state(state)
        except MosaicError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
            raise CheckpointError(
                f"cannot resume from {self.resume_from}: {ckpt.STATE_FILE} is corrupt ({type(err).__name__}: {err})"
            ) from None

    def _restore_state(self, state: dict) -> None:
        ckpt.restore_optimizer(self.resume_from, self.optimizer, state)
        ckpt.restore_rng(self.resume_from, self.ctx.rank, self.device)
        self.sampler.load_state_dict(state["sampler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.faults.load_state_dict(state)
        if self.stop_at is not None and self.stop_at <= self.step:
            raise ConfigError(f"--stop-at {self.stop_at} is not after the checkpoint's step {self.step}")

    # -- one optimizer step ---------------------------------------------------------------------------

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, str | None]:
        """Accumulate gradients over fresh micro-batches, clip, and step; returns (mean loss over the
        processes, grad norm, fault). A faulty step (see guards.py) leaves weights and AdamW as they were."""
        cfg = self.config
        set_lr(self.optimizer, lr_at(self.step, cfg.lr, cfg.final_lr, cfg.warmup_steps, cfg.decay_steps))
        total = torch.zeros((), device=self.device)
        for m, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = m == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.ctx.enabled else self.train_model.no_sync()
            with sync:
                with autocast_context(self.device, cfg.dtype):
                    _, loss = self.train_model(x, y)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach().float()
        self.scaler.unscale_(self.optimizer)  # a no-op without float16
        grad_norm = grad_norm_and_clip(list(self.model.parameters()), cfg.grad_clip)
        # One host sync per step (the .tolist()): every process must take the same decision.
        local = torch.stack([total / len(micro_batches), grad_norm.to(total)]).tolist()
        loss_value, norm = (v / self.ctx.world_size for v in distrib.all_reduce_sum(self.ctx, local, self.device))
        fault = self.faults.describe(loss_value, norm, grads_checked=not self.scaler.is_enabled())
        if fault is None:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm, fault

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows, averaged over all processes."""
        cfg = self.config
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for x, y in eval_batches(
            self.val_tokens, self.seq_len, cfg.batch_size, cfg.eval_batches, cfg.seed,
            self.ctx.rank, self.ctx.world_size,
        ):  # fmt: skip
            with autocast_context(self.device, cfg.dtype):
                _, loss = self.model(x.to(self.device), y.to(self.device))
            total, count = total + float(loss), count + 1
        self.model.train(was_training)
        total, count = distrib.all_reduce_sum(self.ctx, [total, count], self.device)
        return total / count

    # -- bookkeeping ----------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed,
            "train_config": self.config.to_dict(),
            "sampler": self.sampler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            **self.faults.state_dict(),
            "world_size": self.ctx.world_size,
            "data": {
                "path": self.data_dir,
                "tokenizer": self.data.tokenizer.name,
                "tokenizer_fingerprint": self.data.tokenizer.fingerprint(),
                "train_tokens": len(self.train_tokens),
            },
        }

    def save(self) -> None:
        rng_states = distrib.all_gather_objects(self.ctx, ckpt.rng_state(self.device))
        if self.ctx.is_main:
            ckpt.save_checkpoint(
                self.out, self.model, self.optimizer, self.data.tokenizer, self.trainer_state(), rng_states
            )
        distrib.barrier(self.ctx)

    def _open_metrics(self):
        """metrics.jsonl for appending; on resume, rows after the checkpoint's step are dropped first."""
        path = self.out / "metrics.jsonl"
        if self.resuming and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _row_step(line) is not None]
            kept = [line for line in kept if _row_step(line) <= self.step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            tmp.replace(path)
        return path.open("a", encoding="utf-8")

    def _write_run_config(self) -> None:
        payload = {
            "data": self.data_dir,
            "train_config": self.config.to_dict(),
            "model_type": self.config.model,
            "model_config": self.model_config.to_dict(),
            "world_size": self.ctx.world_size,
            "grad_accum": self.accum,
            "seq_len": self.seq_len,
        }
        (self.out / "run_config.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    # -- the run --------------------------------------------------------------------------------------

    def _is_due(self, interval: int | None, end: int) -> bool:
        return self.step == end or (interval is not None and self.step % interval == 0)

    def run(self) -> TrainResult:
        cfg = self.config
        end = min(cfg.max_steps, self.stop_at) if self.stop_at else cfg.max_steps
        if self.ctx.is_main and self.resume_from is None:
            make_run_dir(self.out)
            self._write_run_config()
        elif self.ctx.is_main:
            self.resume_from = ckpt.settle_after_crash(self.out, self.resume_from)
        distrib.barrier(self.ctx)
        self.metrics = self._open_metrics() if self.ctx.is_main else None
        self.result = TrainResult(self.out, self.step, finished=self.step >= cfg.max_steps)
        self.session_time, self.session_tokens = 0.0, 0  # this session only, for tokens/s
        bar = self._progress_bar(end)
        try:
            while self.step < end:
                self._one_step(end, bar)
        except OSError as err:  # a full disk or a folder made read-only while training
            raise MosaicError(
                f"cannot write to the run folder {self.out} at step {self.step} ({err.strerror or err}); "
                f"{self._last_checkpoint()}; free space and resume with --resume"
            ) from None
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        self.result.step, self.result.finished = self.step, self.step >= cfg.max_steps
        self.result.tokens_per_s = self._rate() or None
        return self.result

    def _one_step(self, end: int, bar) -> None:
        cfg = self.config
        started = time.perf_counter()
        loss, grad_norm, fault = self.train_step(self.sampler.next_step())
        self.step += 1
        self.tokens_seen += self.sampler.global_rows * self.seq_len
        self._count_time(time.perf_counter() - started)
        self.faults.record(fault)
        if fault is not None:
            self._log_fault(fault)
            if self.faults.must_stop:
                raise self.faults.stop_error(self.step, fault, self._last_checkpoint())
        elif self._is_due(cfg.log_interval, end):
            self._log_train(loss, grad_norm, bar)
        bar.update(1)
        evaluated = self._is_due(cfg.eval_interval, cfg.max_steps) or self.step == end
        if evaluated:
            self._log_val(self.evaluate())
        if self._is_due(cfg.ckpt_interval or cfg.eval_interval, end):
            self.save()  # faulty steps changed no weight: these are the last good ones
        if evaluated and self.ctx.is_main:
            self._plot()  # with each validation point (a plot takes longer than a tiny model's step)

    def _last_checkpoint(self) -> str:
        try:
            folder = ckpt.find_resumable(self.out)
        except CheckpointError:
            folder = None
        if folder is None:
            return "no checkpoint was written yet"
        step = ckpt.read_trainer_state(folder)["step"]
        return f"the last checkpoint {folder} (step {step}) is intact"

    def _count_time(self, seconds: float) -> None:
        self.session_time += seconds
        self.session_tokens += self.sampler.global_rows * self.seq_len
        self.elapsed += seconds

    def _rate(self) -> float:
        return self.session_tokens / self.session_time if self.session_time > 0 else 0.0

    def _log_fault(self, fault: str) -> None:
        counts = self.faults.state_dict()
        self._emit({"kind": "fault", "step": self.step, "fault": fault, **counts})
        log.warning(
            "step %d skipped: %s (%d in a row, %d in all; the run stops at %d in a row)",
            self.step, fault, counts["bad_steps_in_a_row"], counts["bad_steps"], self.faults.max_bad_steps,
        )  # fmt: skip

    def _log_train(self, loss: float, grad_norm: float, bar) -> None:
        row = {
            "kind": "train",
            "step": self.step,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": self._rate(),
            "elapsed_s": self.elapsed,
        }
        self._emit(row)
        self.result.last_loss = loss
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self._rate():,.0f}")

    def _log_val(self, val: float) -> None:
        self._emit({"kind": "val", "step": self.step, "val_loss": val, "val_perplexity": math.exp(min(val, 50.0))})
        self.result.last_val_loss = val

    def _emit(self, row: dict) -> None:
        self.result.history.append(row)
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def _progress_bar(self, end: int):
        from tqdm.auto import tqdm

        return tqdm(
            total=end, initial=self.step, desc="train", unit="step", file=sys.stderr,
            disable=not (self.progress and self.ctx.is_main), dynamic_ncols=True,
        )  # fmt: skip

    def _plot(self) -> None:
        from memory_mosaics.eval.plots import plot_training_curves

        plot_training_curves(self.out / "metrics.jsonl", self.out / "loss.png")


def train(data_dir: str | Path, out: str | Path, config: TrainConfig, model_settings=None, **options) -> TrainResult:
    """Train a model on prepared data (see `mosaic prepare`) into the run folder `out`.

    `options` are Trainer's: resume (continue `out`), stop_at (save and stop after that step) and
    progress (show a progress bar)."""
    trainer = Trainer(data_dir, out, config, model_settings, **options)
    try:
        return trainer.run()
    finally:
        distrib.teardown(trainer.ctx)
