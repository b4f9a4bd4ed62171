"""Checkpoint folders: safetensors and JSON only, written whole or not at all.

A run folder holds its latest checkpoint in `RUN/checkpoint/`:

    config.json, model.safetensors   the model (save_pretrained / memory_mosaics.load)
    tokenizer/                       the tokenizer the model was trained with
    optimizer.safetensors            AdamW moments, one tensor per (parameter, statistic)
    rng.safetensors                  torch random-generator states (dropout)
    trainer_state.json               step, training config, optimizer groups, sampler, scaler, data
                                     identity; written last, so its presence marks a whole checkpoint

A new checkpoint is written to `RUN/checkpoint.tmp`, then swapped in by renames; the previous one is
kept as `RUN/checkpoint.prev` until the swap is done, so a crash at any moment leaves one whole
checkpoint behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from memory_mosaics.errors import CheckpointError, MosaicError

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
LATEST = "checkpoint"


# ---------------------------------------------------------------------------------------------------
# Optimizer state <-> tensors + JSON (torch's own state_dict would need pickle)


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------
# Locating checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for `--ckpt PATH`: PATH itself if it holds a model, else PATH/checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    for name in (LATEST, LATEST + ".prev"):
        if (path / name / "config.json").is_file():
            return path / name
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run folder written by `mosaic train`")
    raise CheckpointError(
        f"{path} holds no checkpoint (no config.json in it or in {path / LATEST}); "
        "pass a run folder written by `mosaic train` or a folder written by save_pretrained"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete") from None
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({err})") from None


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a checkpoint or save_pretrained folder, with corrupt files reported as CheckpointError."""
    import memory_mosaics

    folder = resolve_checkpoint(folder)
    try:
        model = memory_mosaics.load(folder)
    except MosaicError:
        raise
    except (OSError, SafetensorError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot load the model in {folder}: {err}") from None
    return model.to(device)


def load_tokenizer_of(folder: str | Path):
    """The tokenizer saved beside a checkpoint's model."""
    from memory_mosaics.data.tokenizers import load_tokenizer

    folder = resolve_checkpoint(folder)
    if not (folder / "tokenizer").is_dir():
        raise CheckpointError(f"{folder} has no tokenizer/ folder; it was not written by `mosaic train`")
    return load_tokenizer(folder / "tokenizer")


# ---------------------------------------------------------------------------------------------------
# Saving and loading training checkpoints


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    trainer_state: dict[str, Any],
    rng_states: list[dict[str, torch.Tensor]],
) -> Path:
    """Write RUN/checkpoint whole: build it in RUN/checkpoint.tmp, then swap it in."""
    run_dir = Path(run_dir)
    final, tmp, prev = run_dir / LATEST, run_dir / (LATEST + ".tmp"), run_dir / (LATEST + ".prev")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    model.save_pretrained(tmp)
    tokenizer.save(tmp / "tokenizer")
    tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {f"rank{r}.{k}": t for r, states in enumerate(rng_states) for k, t in states.items()}
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {"format_version": FORMAT_VERSION, **trainer_state, "optimizer": optim_meta}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        final.rename(prev)
    tmp.rename(final)
    shutil.rmtree(prev, ignore_errors=True)
    return final


def find_resumable(run_dir: str | Path) -> Path:
    """The whole checkpoint to resume RUN from, or a CheckpointError that says what is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: run folder {run_dir} does not exist; drop --resume to start it")
    for name in (LATEST, LATEST + ".prev"):
        if (run_dir / name / STATE_FILE).is_file():
            return run_dir / name
    raise CheckpointError(
        f"cannot resume: {run_dir} holds no whole checkpoint ({run_dir / LATEST / STATE_FILE} is missing)"
    )


def read_trainer_state(folder: Path) -> dict[str, Any]:
    state = _read_json(folder / STATE_FILE)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / STATE_FILE} has format_version {state.get('format_version')!r}; "
            f"this version reads {FORMAT_VERSION}"
        )
    return state


def restore_optimizer(folder: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    tensors = _read_tensors(folder / "optimizer.safetensors")
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"optimizer state in {folder} does not fit the model: {err}") from None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random-generator states (dropout draws from them)."""
    states = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(folder: Path, rank: int, device: torch.device) -> None:
    tensors = _read_tensors(folder / "rng.safetensors")
    key = f"rank{rank}.torch_cpu"
    if key not in tensors:
        raise CheckpointError(
            f"{folder / 'rng.safetensors'} has no generator state for process {rank}; "
            "resume with the number of processes the run was saved with"
        )
    torch.set_rng_state(tensors[key])
    if device.type == "cuda" and f"rank{rank}.torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"rank{rank}.torch_cuda"], device)
