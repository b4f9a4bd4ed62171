"""Interpretability: what each memory of a Memory Mosaic retrieved, as JSON, an HTML page and a PNG."""

from memory_mosaics.inspect.retrieval import Inspection, context_weights, inspect_sequence

__all__ = ["Inspection", "context_weights", "inspect_sequence"]
