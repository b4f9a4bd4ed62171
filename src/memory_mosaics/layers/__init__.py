"""nn.Modules: key/value feature extractors and the context and persistent memories."""

from memory_mosaics.layers.memory import (
    ContextMemory,
    KeyFeatureExtractor,
    PersistentMemory,
    ValueFeatureExtractor,
)

__all__ = ["ContextMemory", "KeyFeatureExtractor", "PersistentMemory", "ValueFeatureExtractor"]
