"""Models: the Memory Mosaic, the GPT baseline, and (in `baselines`) the RNN/SSM baselines."""

from memory_mosaics.models.base import PretrainedModel, load
from memory_mosaics.models.gpt import GPT, GPTConfig
from memory_mosaics.models.memory_mosaic import MemoryMosaic, MemoryMosaicConfig

# Imported for its side effect too: it registers the baselines' model types, so `load` knows them.
from memory_mosaics.models import baselines  # noqa: E402, I001

__all__ = ["GPT", "GPTConfig", "MemoryMosaic", "MemoryMosaicConfig", "PretrainedModel", "baselines", "load"]
