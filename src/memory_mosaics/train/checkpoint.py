"""Checkpoint folders: safetensors and JSON only, written whole or not at all.

A run folder holds its latest checkpoint in `RUN/checkpoint/`:

    config.json, model.safetensors   the model (save_pretrained / memory_mosaics.load)
    tokenizer/                       the tokenizer the model was trained with
    optimizer.safetensors            AdamW moments, one tensor per (parameter, statistic)
    rng.safetensors                  torch random-generator states (dropout)
    trainer_state.json               step, training config, optimizer groups, sampler, scaler, data
                                     identity; written last, so its presence marks a whole checkpoint

A new checkpoint is written to `RUN/checkpoint.tmp`; every file and folder in it is fsynced, then it
is swapped in by renames (the run folder fsynced after each); the previous one is kept as
`RUN/checkpoint.prev` until the swap is done. trainer_state.json lists every other file with its size,
so a reader can tell a whole checkpoint from a damaged one. A `kill -9` (or a power cut) at any
moment therefore leaves at least one whole checkpoint, and `find_resumable` picks the newest whole
one: `checkpoint/`, else `checkpoint.prev/`.

Test hook: with the environment variable MOSAIC_CRASH_AT=STAGE:STEP, the process kills itself with
SIGKILL at STAGE of writing the checkpoint of step STEP, where STAGE is `writing` (the new checkpoint
half written), `swapping` (the old one moved to .prev, the new one not yet in place) or `swapped`
(the new one in place, .prev not yet removed). tests/train/test_crash.py uses it to hit the middle
of a write deterministically; nothing else sets it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from memory_mosaics.errors import CheckpointError, MosaicError

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
RUN_CONFIG = "run_config.json"
LATEST = "checkpoint"
CRASH_ENV = "MOSAIC_CRASH_AT"


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
    """The checkpoint folder for `--ckpt PATH`: PATH itself if it holds a model, else the newest whole
    checkpoint of the run folder PATH (PATH/checkpoint, else PATH/checkpoint.prev)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    candidates = [path / name for name in (LATEST, LATEST + ".prev") if (path / name / "config.json").is_file()]
    for folder in candidates:
        try:
            if whole_checkpoint_problem(folder) is None:
                return folder
        except CheckpointError:
            continue
    if candidates:  # none is whole: loading the newest reports what is wrong with it
        return candidates[0]
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
    """The tokenizer saved beside a checkpoint's model, checked against the model and the run."""
    from memory_mosaics.data.tokenizers import load_tokenizer
    from memory_mosaics.models.base import read_config

    folder = resolve_checkpoint(folder)
    if not (folder / "tokenizer").is_dir():
        raise CheckpointError(f"{folder} has no tokenizer/ folder; it was not written by `mosaic train`")
    tokenizer = load_tokenizer(folder / "tokenizer")
    vocab_size = read_config(folder)[1].get("vocab_size")
    if isinstance(vocab_size, int) and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"{folder / 'tokenizer'} has {tokenizer.vocab_size} tokens but the model in {folder} only "
            f"{vocab_size}: the tokenizer does not belong to this checkpoint"
        )
    if (folder / STATE_FILE).is_file():
        trained_with = read_trainer_state(folder).get("data", {}).get("tokenizer_fingerprint")
        if trained_with is not None and trained_with != tokenizer.fingerprint():
            raise CheckpointError(
                f"{folder / 'tokenizer'} is {tokenizer.fingerprint()} but the model was trained with "
                f"{trained_with} ({folder / STATE_FILE}): the tokenizer does not belong to this checkpoint"
            )
    return tokenizer


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
    """Write RUN/checkpoint whole: build it in RUN/checkpoint.tmp, fsync it, then swap it in.

    A write that fails (a full disk, a read-only folder) raises CheckpointError and leaves the
    previous checkpoint as it was.
    """
    run_dir = Path(run_dir)
    final, tmp, prev = run_dir / LATEST, run_dir / (LATEST + ".tmp"), run_dir / (LATEST + ".prev")
    step = trainer_state.get("step")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        _crash_point("writing", step)
        tokenizer.save(tmp / "tokenizer")
        tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {f"rank{r}.{k}": t for r, states in enumerate(rng_states) for k, t in states.items()}
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"format_version": FORMAT_VERSION, **trainer_state, "optimizer": optim_meta, "files": _sizes(tmp)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"; the previous checkpoint {final} is kept" if final.exists() else ""
        reason = getattr(err, "strerror", None) or err
        raise CheckpointError(f"cannot write checkpoint {tmp} ({reason}){kept}; free space or fix the folder") from None

    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        final.rename(prev)
        _fsync_dir(run_dir)
    _crash_point("swapping", step)
    tmp.rename(final)
    _fsync_dir(run_dir)
    _crash_point("swapped", step)
    shutil.rmtree(prev, ignore_errors=True)
    return final


def settle_after_crash(run_dir: Path, resumed_from: Path) -> Path:
    """Before a resumed run writes anything: make the whole checkpoint it resumed from RUN/checkpoint
    again (dropping a damaged newer one) and remove what a crash left (checkpoint.tmp, .prev), so
    that the next save starts from the usual state. Every step keeps one whole checkpoint."""
    final = run_dir / LATEST
    if resumed_from != final:
        shutil.rmtree(final, ignore_errors=True)
        resumed_from.rename(final)
        _fsync_dir(run_dir)
    for name in (LATEST + ".tmp", LATEST + ".prev"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    return final


def _crash_point(stage: str, step: int | None) -> None:
    """The test hook described in the module docstring."""
    if os.environ.get(CRASH_ENV) == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file, then every folder (deepest first), so the data is on disk before the rename."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(path)
    _fsync_dir(folder)


def whole_checkpoint_problem(folder: Path) -> str | None:
    """None when `folder` holds a whole training checkpoint, else what is wrong with it."""
    if not (folder / STATE_FILE).is_file():
        return f"{folder / STATE_FILE} is missing (the checkpoint was not finished)"
    state = _read_json(folder / STATE_FILE)  # raises CheckpointError("... is corrupt") for a damaged file
    files = state.get("files", {}) if isinstance(state, dict) else None
    if not isinstance(files, dict):
        return f"{folder / STATE_FILE} is corrupt (no file list)"
    for name, size in files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"{folder / STATE_FILE} is corrupt (it lists the file {name!r} outside the checkpoint)"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is damaged ({path.stat().st_size} bytes, {size} when it was written)"
    return None


def find_resumable(run_dir: str | Path) -> Path | None:
    """The newest whole checkpoint to resume RUN from; None for a run stopped before its first one.

    Raises CheckpointError when there is nothing to resume, or only damaged checkpoints.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: run folder {run_dir} does not exist; drop --resume to start it")
    problems = []
    for name in (LATEST, LATEST + ".prev"):
        folder = run_dir / name
        if folder.is_dir():
            try:
                problem = whole_checkpoint_problem(folder)
            except CheckpointError as err:
                problem = str(err)
            if problem is None:
                return folder
            problems.append(problem)
    if problems:
        raise CheckpointError(f"cannot resume: {'; '.join(problems)}, and there is no earlier whole checkpoint")
    if (run_dir / RUN_CONFIG).is_file():
        return None  # stopped before its first checkpoint: the run starts again from step 0
    raise CheckpointError(f"cannot resume: {run_dir} holds no checkpoint ({run_dir / LATEST / STATE_FILE} is missing)")


# The fields of trainer_state.json that resuming reads, with their types: a damaged or hand-edited
# file is refused here with the field's name rather than failing somewhere inside the trainer.
STATE_FIELDS = {
    "step": int,
    "tokens_seen": int,
    "elapsed_s": (int, float),
    "train_config": dict,
    "sampler": dict,
    "scaler": dict,
    "optimizer": dict,
    "data": dict,
}


def read_trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    state = _read_json(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is corrupt (expected a JSON object)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {state.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    for name, kind in STATE_FIELDS.items():
        value = state.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path} is corrupt: field {name!r} is {value!r}")
    for name in ("bad_steps", "bad_steps_in_a_row"):  # absent from checkpoints of older versions
        value = state.setdefault(name, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"{path} is corrupt: field {name!r} is {value!r}")
    for name in ("step", "tokens_seen", "elapsed_s", "bad_steps", "bad_steps_in_a_row"):
        if state[name] < 0:
            raise CheckpointError(f"{path} is corrupt: field {name!r} is negative ({state[name]})")
    if not isinstance(state["sampler"].get("step"), int) or state["sampler"]["step"] < 0:
        raise CheckpointError(f"{path} is corrupt: sampler step is {state['sampler'].get('step')!r}")
    return state


def restore_optimizer(folder: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    tensors = _read_tensors(folder / "optimizer.safetensors")
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:
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
    try:
        torch.set_rng_state(tensors[key])
        if device.type == "cuda" and f"rank{rank}.torch_cuda" in tensors:
            torch.cuda.set_rng_state(tensors[f"rank{rank}.torch_cuda"], device)
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"{folder / 'rng.safetensors'} holds no valid generator state ({err})") from None
