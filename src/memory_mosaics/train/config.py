"""Training configuration, and one way to fill any config dataclass from presets, YAML files and flags.

A field is the same name everywhere: `n_layer` in a dataclass, `n_layer: 4` in YAML, `--n-layer 4` on the
command line. Values are resolved in this order, later ones winning: the dataclass defaults, a preset
(`--preset NAME`, a YAML file shipped in `memory_mosaics/presets/`), a YAML file (`--config FILE`), and
finally the flags that were actually typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from memory_mosaics.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
MODEL_TYPES = ("mosaic", "gpt")


def _positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: float | None) -> None:
    if value is None or value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")


def _field(default: Any, help_text: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Everything about a training run except the model's own shape (that is the model config)."""

    model: Literal["mosaic", "gpt"] = _field("mosaic", "the model to train")
    max_steps: int = _field(1000, "optimizer steps; the cosine schedule ends here unless --lr-decay-steps")
    batch_size: int = _field(16, "windows per micro-batch on each process")
    grad_accum: int | None = _field(None, "micro-batches per step (default 1, or from --global-batch-size)")
    global_batch_size: int | None = _field(None, "windows per optimizer step over all processes")
    seq_len: int | None = _field(None, "training window length (default: the model's block_size)")
    lr: float = _field(1e-3, "peak learning rate")
    min_lr: float | None = _field(None, "final learning rate of the cosine (default lr/10)")
    warmup_steps: int = _field(100, "linear warmup steps")
    lr_decay_steps: int | None = _field(None, "step where the cosine reaches min_lr (default max_steps)")
    weight_decay: float = _field(0.1, "AdamW weight decay, on tensors of 2 or more dimensions only")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this (0: no clipping)")
    eval_interval: int = _field(200, "validation loss every N steps (and at the end)")
    eval_batches: int = _field(20, "validation batches per evaluation")
    log_interval: int = _field(1, "a metrics.jsonl row every N steps (and at the end)")
    ckpt_interval: int | None = _field(None, "checkpoint every N steps (default: every evaluation)")
    seed: int = _field(1337, "seed of the weights, the windows and dropout")
    dtype: Literal["float32", "bfloat16", "float16"] = _field("float32", "autocast precision (CPU and CUDA)")
    compile: bool = _field(False, "torch.compile the model for training")
    device: str = _field("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N")
    max_bad_steps: int = _field(5, "stop after this many steps in a row with a NaN/inf loss or gradient")

    def __post_init__(self) -> None:
        if self.model not in MODEL_TYPES:
            raise ConfigError(f"model must be one of {', '.join(MODEL_TYPES)}, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_steps", "batch_size", "lr", "eval_interval", "eval_batches", "log_interval", "max_bad_steps"):
            _positive(name, getattr(self, name))
        for name in ("grad_accum", "global_batch_size", "seq_len", "lr_decay_steps", "ckpt_interval"):
            _positive(name, getattr(self, name), allow_none=True)
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            _non_negative(name, getattr(self, name))
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be between 0 and lr={self.lr}, got {self.min_lr!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def decay_steps(self) -> int:
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process, checked against global_batch_size."""
        per_micro = self.batch_size * world_size
        if self.global_batch_size is None:
            return self.grad_accum or 1
        if self.global_batch_size % per_micro:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not a multiple of batch_size "
                f"{self.batch_size} x {world_size} process(es); change --batch-size or --global-batch-size"
            )
        derived = self.global_batch_size // per_micro
        if self.grad_accum is not None and self.grad_accum != derived:
            raise ConfigError(
                f"grad_accum {self.grad_accum} contradicts global_batch_size {self.global_batch_size} = "
                f"batch_size {self.batch_size} x {world_size} process(es) x {derived}; set only one of them"
            )
        return derived

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return build_dataclass(cls, values, source="training config")


# ---------------------------------------------------------------------------------------------------
# Dataclass <-> flags and YAML


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for `X | None` / `Optional[X]`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(tp: Any):
    """An argparse `type=` for a field type, and its choices if it is a Literal."""
    inner, optional = _unwrap_optional(tp)
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        return type(choices[0]), choices
    if inner is bool:
        return _parse_bool, None
    if inner in (int, float, str):
        base = inner

        def convert(text: str):
            if optional and text.lower() == "none":
                return None
            return base(text)

        convert.__name__ = base.__name__  # argparse names the type in its error message
        return convert, None
    return None, None  # lists, dicts...: YAML only


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, seen: set[str] | None = None) -> list[str]:
    """Add one `--field-name` flag per field of `cls` (skipping names in `seen`); return the names added.

    Flags default to "not given" (argparse.SUPPRESS), so a flag only overrides a preset or YAML value
    when it was typed. Booleans take `--flag` / `--no-flag`.
    """
    seen = set() if seen is None else seen
    added = []
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        if field.name in seen or not field.init:
            continue
        tp = hints[field.name]
        inner, _ = _unwrap_optional(tp)
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"{field.metadata.get('help', cls.__name__ + '.' + field.name)} (default {default!r})"
        if inner is bool:
            parser.add_argument(
                flag_name(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            convert, choices = _converter(tp)
            if convert is None:
                continue
            parser.add_argument(
                flag_name(field.name),
                dest=field.name,
                type=convert,
                choices=choices,
                default=argparse.SUPPRESS,
                metavar=None if choices else {int: "N", float: "X"}.get(inner, "TEXT"),
                help=help_text,
            )
        seen.add(field.name)
        added.append(field.name)
    return added


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _check_value(cls: type, name: str, value: Any, source: str) -> Any:
    """Coerce a YAML value to the field's type (ints are fine where floats are expected)."""
    tp = _field_types(cls)[name]
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name} cannot be null")
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{source}: {name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
        return value
    if inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, str):
        try:  # YAML reads `5e-3` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if inner is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if inner is str and isinstance(value, str):
        return value
    if inner in (int, float, str):
        raise ConfigError(f"{source}: {name} must be {inner.__name__}, got {value!r}")
    return value


def unknown_key_error(key: str, known: set[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown setting {key!r}{hint}")


def build_dataclass(cls: type, values: dict[str, Any], source: str) -> Any:
    """Build `cls(**values)` with each value checked against its field type; unknown keys are refused."""
    known = field_names(cls)
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise unknown_key_error(key, known, source)
        checked[key] = _check_value(cls, key, value, source)
    try:
        return cls(**checked)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


# ---------------------------------------------------------------------------------------------------
# Presets and YAML files


def _preset_folder():
    return resources.files("memory_mosaics") / "presets"


def available_presets() -> list[str]:
    folder = _preset_folder()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of setting: value, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def load_preset(name: str) -> dict[str, Any]:
    """The settings of a preset shipped with the package, e.g. `tinystories-cpu`."""
    names = available_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(names) or 'none'}")
    text = (_preset_folder() / f"{name}.yaml").read_text(encoding="utf-8")
    return _parse_yaml(text, f"preset {name}")


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason}); pass a YAML file") from None
    return _parse_yaml(text, str(path))


def resolve_settings(
    preset: str | None, config_file: str | None, flags: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge preset < config file < typed flags; also return where each value came from."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    layers = []
    if preset:
        layers.append((f"preset {preset}", load_preset(preset)))
    if config_file:
        layers.append((str(config_file), load_yaml_file(config_file)))
    layers.append(("command line", flags))
    for source, values in layers:
        for key, value in values.items():
            merged[key] = value
            origin[key] = source
    return merged, origin
