"""Models: the Memory Mosaic, the GPT baseline, and (in `baselines`) the RNN/SSM baselines."""

# Imported for its side effect too: it registers the baselines' model types, so `load` knows them.
from memory_mosaics.models import baselines
from memory_mosaics.models.base import PretrainedModel, load
from memory_mosaics.models.gpt import GPT, GPTConfig
from memory_mosaics.models.memory_mosaic import MemoryMosaic, MemoryMosaicConfig

__all__ = ["GPT", "GPTConfig", "MemoryMosaic", "MemoryMosaicConfig", "PretrainedModel", "baselines", "load"]
