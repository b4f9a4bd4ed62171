"""Checks a training run makes before it writes a byte: output folder, model size, resumable settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from memory_mosaics.errors import ConfigError, MosaicError
from memory_mosaics.models.base import min_param_count
from memory_mosaics.train import checkpoint as ckpt
from memory_mosaics.train.config import TrainConfig, build_dataclass

# Settings that may change when a run is resumed: they do not change what is computed
# (max_steps does, and is allowed on purpose, to extend a finished run).
RESUMABLE_CHANGES = {
    "max_steps",
    "eval_interval",
    "eval_batches",
    "log_interval",
    "ckpt_interval",
    "compile",
    "device",
    "max_bad_steps",
}


def model_classes(model_type: str):
    from memory_mosaics import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig

    return {"mosaic": (MemoryMosaic, MemoryMosaicConfig), "gpt": (GPT, GPTConfig)}[model_type]


def check_new_run_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MosaicError(f"--out {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        what = "a training run" if (out / "metrics.jsonl").exists() or (out / ckpt.LATEST).exists() else "files"
        raise MosaicError(
            f"--out {out} already holds {what}; pass --resume to continue it, or choose another --out "
            "(nothing was overwritten)"
        )
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise MosaicError(f"cannot create --out {out}: {parent} is a file, not a folder")
            break


def make_run_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        raise MosaicError(f"cannot write to --out {out}: {err.strerror or err}") from None


def build_model_config(model_type: str, settings: dict[str, Any], data_vocab: int):
    """The model config from preset/flag settings; vocab_size defaults to the data's vocabulary."""
    _, config_cls = model_classes(model_type)
    values = dict(settings)
    values.setdefault("vocab_size", data_vocab)
    config = build_dataclass(config_cls, values, source=f"{model_type} model config")
    if config.vocab_size < data_vocab:
        raise ConfigError(
            f"the data's tokenizer has {data_vocab} tokens but the model's vocab_size is "
            f"{config.vocab_size}; "
            "drop --vocab-size (it defaults to the data's) or prepare the data with a smaller tokenizer"
        )
    return config


def check_seq_len(seq_len: int, block_size: int) -> None:
    if seq_len > block_size:
        raise ConfigError(
            f"seq_len {seq_len} is larger than the model's block_size {block_size}; "
            "use --seq-len <= block_size or a model with a larger --block-size"
        )


def check_resume_settings(saved: TrainConfig, wanted: TrainConfig, model_settings: dict, current: dict) -> None:
    """A resumed run computes what the original run would have; refuse settings that would differ.

    `current` is the model config the run was started with, as a dict."""
    saved_d, wanted_d = saved.to_dict(), wanted.to_dict()
    for key, value in wanted_d.items():
        if key not in RESUMABLE_CHANGES and saved_d[key] != value:
            raise ConfigError(
                f"--resume: {key} is {value!r} but the run was started with {saved_d[key]!r}; "
                "resume with the original settings or start a new run with another --out"
            )
    for key, value in model_settings.items():
        if key in current and current[key] != value:
            raise ConfigError(
                f"--resume: model {key} is {value!r} but the checkpoint's model has {current[key]!r}; "
                "resume with the original settings or start a new run with another --out"
            )


# Bytes per parameter while training with AdamW in float32: weights, gradients, two moments.
TRAINING_BYTES_PER_PARAM = 16


def available_memory(device: torch.device) -> int | None:
    """Total memory of the device that will hold the model (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(model_config, device: torch.device) -> None:
    """Refuse a model whose weights, gradients and AdamW state alone surely exceed the device's memory.

    Uses a lower bound on the parameter count computed from the config (nothing is built), so a typo
    such as `--n-embd 1000000` fails at once with a clear message instead of exhausting the machine.
    """
    params = min_param_count(model_config)
    needed, have = params * TRAINING_BYTES_PER_PARAM, available_memory(device)
    if have is not None and needed > have:
        raise ConfigError(
            f"the model has at least {params:,} parameters: training it needs more than "
            f"{needed / 2**30:,.1f} GiB but {device.type} has {have / 2**30:,.1f} GiB; "
            "use a smaller --n-embd, --n-layer or --vocab-size"
        )
