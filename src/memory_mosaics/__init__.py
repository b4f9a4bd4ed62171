"""Memory Mosaics: networks of associative memories for sequence prediction (Zhang et al., ICLR 2025)."""

__version__ = "0.1.0"

from memory_mosaics.inference.generate import generate
from memory_mosaics.models import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig, load

__all__ = ["GPT", "GPTConfig", "MemoryMosaic", "MemoryMosaicConfig", "__version__", "generate", "load"]
