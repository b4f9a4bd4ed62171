"""Models: the Memory Mosaic, the GPT baseline, and (in `baselines`) the RNN/SSM baselines."""

from memory_mosaics.models.base import PretrainedModel, load
from memory_mosaics.models.gpt import GPT, GPTConfig
from memory_mosaics.models.memory_mosaic import MemoryMosaic, MemoryMosaicConfig

__all__ = ["GPT", "GPTConfig", "MemoryMosaic", "MemoryMosaicConfig", "PretrainedModel", "load"]
