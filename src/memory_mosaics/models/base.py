"""What every model of the project shares: typed configs, the loss, and safe saving and loading.

A saved model is a folder with `config.json` (the config's fields plus `model_type`) and
`model.safetensors`. Nothing is ever unpickled: safetensors holds raw tensors and a JSON header.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from memory_mosaics.errors import CheckpointError, ConfigError, MosaicError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

ConfigT = TypeVar("ConfigT", bound="ModelConfig")
ModelT = TypeVar("ModelT", bound="PretrainedModel")

MODEL_TYPES: dict[str, type[PretrainedModel]] = {}


@dataclasses.dataclass
class ModelConfig:
    """Base of the model configs: dict round trip and field checks shared by all of them."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[ConfigT], values: dict[str, Any]) -> ConfigT:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def _check_types(self) -> None:
        """Every field holds its declared type (an int is accepted, and converted, for a float)."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            expected, value = hints[field.name], getattr(self, field.name)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, field.name, float(value))
            elif not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise ConfigError(f"{type(self).__name__}.{field.name} must be {expected.__name__}, got {value!r}")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")

    def _check_heads(self) -> None:
        n_embd, n_head = getattr(self, "n_embd"), getattr(self, "n_head")  # noqa: B009
        if n_embd % n_head:
            raise ConfigError(f"{type(self).__name__}: n_embd ({n_embd}) must be divisible by n_head ({n_head})")

    def _check_dropout(self) -> None:
        dropout = getattr(self, "dropout")  # noqa: B009
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{type(self).__name__}.dropout must be in [0, 1), got {dropout}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(f"{type(self).__name__}.{name} must be one of {', '.join(choices)}, got {value!r}")


def check_token_ids(idx: Tensor, vocab_size: int, every_device: bool = False) -> None:
    """A typed error for token ids the embedding cannot look up, instead of torch's IndexError.

    The forward pass checks on CPU only (`every_device=False`): on an accelerator, reading min/max back
    would stall every pass, and the embedding kernel asserts there anyway. Stepping a recurrent state
    checks on every device: a bad id must be refused before the state changes."""
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        kind = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
        raise MosaicError(f"idx must be an integer tensor of token ids (batch, tokens), got {kind}")
    if idx.numel() == 0 or torch.compiler.is_compiling() or (idx.device.type != "cpu" and not every_device):
        return
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= vocab_size:
        raise MosaicError(f"token ids must be in [0, {vocab_size}) for this model, got range [{low}, {high}]")


def language_model_loss(logits: Tensor, targets: Tensor | None) -> Tensor | None:
    """Mean next-token cross-entropy over targets that are not -1 (at least float32 precision)."""
    if targets is None:
        return None
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


class PretrainedModel(nn.Module):
    """A model with a typed config that saves to and loads from a folder without pickles."""

    model_type: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    # Parameter names that are views of another parameter (tied weights): saved once, tied on load.
    tied_parameters: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "model_type" in cls.__dict__:
            MODEL_TYPES[cls.model_type] = cls

    config: ModelConfig

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters that are lookup tables (tokens, positions); excluded from non-embedding counts."""
        raise NotImplementedError

    def num_params(self, non_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= sum(p.numel() for p in self.embedding_parameters())
        return total

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: tensor.detach().contiguous()
            for name, tensor in self.state_dict().items()
            if name not in self.tied_parameters
        }
        config = {"model_type": self.model_type, **self.config.to_dict()}
        tmp_weights = folder / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp_weights), metadata={"model_type": self.model_type})
        tmp_config = folder / (CONFIG_FILE + ".tmp")
        tmp_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_weights, folder / WEIGHTS_FILE)
        os.replace(tmp_config, folder / CONFIG_FILE)
        return folder

    @classmethod
    def from_pretrained(cls: type[ModelT], folder: str | os.PathLike[str], map_location: str = "cpu") -> ModelT:
        model_type, config_values = read_config(folder)
        if model_type != cls.model_type:
            raise CheckpointError(
                f"{Path(folder) / CONFIG_FILE}: model_type is {model_type!r}, but {cls.__name__} "
                f"loads {cls.model_type!r} (use memory_mosaics.load to pick the class from the file)"
            )
        return cls._build_and_load(folder, config_values, map_location)

    @classmethod
    def _build_and_load(
        cls: type[ModelT], folder: str | os.PathLike[str], config_values: dict[str, Any], map_location: str
    ) -> ModelT:
        config_path = Path(folder) / CONFIG_FILE
        try:
            config = cls.config_class.from_dict(config_values)
        except (ConfigError, TypeError) as err:
            raise CheckpointError(f"{config_path}: invalid config: {err}") from err
        # A config.json with absurd sizes must fail here, not exhaust memory: its sizes are checked
        # against the weights file's header (names and shapes, nothing loaded) before the model is built.
        shapes = read_weight_shapes(folder)
        in_file = sum(math.prod(shape) for shape in shapes.values())
        weights = Path(folder) / WEIGHTS_FILE
        n_layer, at_least = getattr(config, "n_layer", 0), min_param_count(config)
        if n_layer > len(shapes):
            raise CheckpointError(
                f"{config_path}: n_layer is {n_layer} but {weights} holds only {len(shapes)} tensors; "
                "the config and the weights do not belong together"
            )
        if at_least > in_file:
            raise CheckpointError(
                f"{config_path}: its sizes need at least {at_least:,} parameters but {weights} holds "
                f"{in_file:,} numbers; the config and the weights do not belong together"
            )
        try:
            model = cls(config)
        except (RuntimeError, MemoryError, TypeError, ValueError, OverflowError) as err:
            raise CheckpointError(f"{config_path}: cannot build the model it describes ({err})") from None
        # Tied parameters are absent from the file (checked above); loading their source fills them too.
        model.load_state_dict(read_weights(folder, model, map_location), strict=False)
        return model


def read_config(folder: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """Read and check `config.json`; returns (model_type, the config fields)."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a saved model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(values, dict) or "model_type" not in values:
        raise CheckpointError(f"{path}: expected a JSON object with a 'model_type' field")
    model_type = values.pop("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise CheckpointError(f"{path}: unknown model_type {model_type!r}; known: {', '.join(sorted(MODEL_TYPES))}")
    return model_type, values


def min_param_count(config: ModelConfig) -> int:
    """A cheap lower bound on the parameters of a model with this config, from the contract's field
    names: a vocab_size x n_embd embedding, an n_embd x n_embd matrix in each of n_layer blocks, and
    pmem_count pmem_size x n_embd persistent memories in each block that has one, and a block_size x n_embd
    position table where the config says it has one. Used to refuse absurd sizes before anything is
    allocated."""
    vocab, width, layers = (getattr(config, name, 0) for name in ("vocab_size", "n_embd", "n_layer"))
    slots = (
        0 if getattr(config, "attn_only", False) else getattr(config, "pmem_size", 0) * getattr(config, "pmem_count", 1)
    )
    positions = getattr(config, "block_size", 0) if getattr(config, "position_table", False) else 0
    return (vocab + positions) * width + layers * width * (width + slots)


def read_weight_shapes(folder: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes in `model.safetensors`, read from its header alone."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a saved model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def check_weight_shapes(
    folder: str | os.PathLike[str], model: PretrainedModel, shapes: dict[str, tuple[int, ...]]
) -> None:
    """The file holds exactly the model's tensors (tied ones excepted), each with the model's shape."""
    path = Path(folder) / WEIGHTS_FILE
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in model.tied_parameters}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong_shape = [
        f"{name} {shapes[name]} (config wants {shape})"
        for name, shape in expected.items()
        if name in shapes and shapes[name] != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
    if wrong_shape:
        problems.append(f"wrong shape {', '.join(wrong_shape[:4])}")
    if problems:
        raise CheckpointError(f"{path}: weights do not match {Path(folder) / CONFIG_FILE}: {'; '.join(problems)}")


def read_weights(
    folder: str | os.PathLike[str], model: PretrainedModel, map_location: str = "cpu"
) -> dict[str, Tensor]:
    """Load `model.safetensors` and check it holds exactly the model's tensors, as floats."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a saved model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    check_weight_shapes(folder, model, {name: tuple(t.shape) for name, t in tensors.items()})
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected a float dtype")
    return {name: tensor.to(expected[name].dtype) for name, tensor in tensors.items()}


def load(folder: str | os.PathLike[str], map_location: str = "cpu") -> PretrainedModel:
    """Load any saved model of the project, picking its class from `model_type` in config.json."""
    model_type, config_values = read_config(folder)
    return MODEL_TYPES[model_type]._build_and_load(folder, config_values, map_location)
