"""Inference: recurrent state, bounded context memories with eviction, approximate retrieval."""

from memory_mosaics.inference.bounded import FIFO, LRU, EvictionPolicy, SinkRecent, SlotMemory
from memory_mosaics.inference.options import EVICTION_POLICIES, RETRIEVAL_METHODS, InferenceOptions
from memory_mosaics.inference.state import (
    GPTState,
    MosaicState,
    gpt_step,
    init_gpt_state,
    init_mosaic_state,
    mosaic_step,
)

__all__ = [
    "EVICTION_POLICIES",
    "FIFO",
    "LRU",
    "RETRIEVAL_METHODS",
    "EvictionPolicy",
    "GPTState",
    "InferenceOptions",
    "MosaicState",
    "SinkRecent",
    "SlotMemory",
    "gpt_step",
    "init_gpt_state",
    "init_mosaic_state",
    "mosaic_step",
]
