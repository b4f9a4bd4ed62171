"""Pure tensor functions: the leaky average, memory retrieval and the GPT's GELU, each fast form beside its
plain twin."""

from memory_mosaics.ops.gelu_cpu import gelu_tanh
from memory_mosaics.ops.leaky_average import (
    leaky_average,
    leaky_average_reference,
    leaky_average_step,
)
from memory_mosaics.ops.normalize import scaled_normalize, scaled_normalize_reference
from memory_mosaics.ops.retrieval import (
    context_read,
    context_retrieval,
    context_retrieval_reference,
    leading_rows,
    persistent_retrieval,
    persistent_retrieval_reference,
)

__all__ = [
    "context_read",
    "context_retrieval",
    "context_retrieval_reference",
    "gelu_tanh",
    "leading_rows",
    "leaky_average",
    "leaky_average_reference",
    "leaky_average_step",
    "persistent_retrieval",
    "persistent_retrieval_reference",
    "scaled_normalize",
    "scaled_normalize_reference",
]
