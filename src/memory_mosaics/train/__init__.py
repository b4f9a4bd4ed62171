"""Training: typed configs and presets, AdamW and its schedule, windows, checkpoints, torchrun."""

from memory_mosaics.train.config import TrainConfig, available_presets, load_preset
from memory_mosaics.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "available_presets", "load_preset", "train"]
