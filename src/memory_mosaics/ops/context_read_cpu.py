"""The context memory's causal read as a compiled CPU kernel (bf16, CPUs with AMX), with a plain fallback.

`csrc/context_read_cpu.cpp` computes, for each (batch, head) sequence of keys k and values v (B, H, T, d),

    out_t = sum_{s <= t - shift} softmax_s(<k_t, k_s>) v_s   (t >= shift),   out_t = 0   (t < shift),

forward and backward, in blocks of query rows over the admissible columns only, with scores in float32
and products in oneDNN's bf16 micro-kernels — the persistent read's kernel made causal
(`persistent_read_cpu.py`). The read comes out in the (B, T, H d) layout the output projection takes,
and the backward pass returns the keys' gradient with the queries' and the stored keys' parts summed,
where the fused attention path slices the keys into both, transposes the read and pads it.

Built on first use (about 40 s, cached; `cpu_extensions`) and used only where it can run: the CPU has
AVX512-BF16 and AMX, bf16 keys and values, d a multiple of 32, 0 < shift < T, no dropout (`usable`).
`MOSAIC_CPU_KERNEL=0` turns it off. The plain twin it is tested against is
`retrieval.context_retrieval_reference`.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from torch import Tensor

from memory_mosaics.ops import cpu_extensions, persistent_read_cpu

logger = logging.getLogger(__name__)
BLOCK_ROWS = 128  # query rows per block
D_MULTIPLE = 32  # d must be a multiple of this (the kernel's check)
NAME = "memory_mosaics_context_read_cpu"


@lru_cache(maxsize=1)
def kernel():
    """The compiled module, or None where it cannot be built or run here (the reason is logged)."""
    if persistent_read_cpu.kernel() is None:  # the same CPU requirements; the reason is logged there
        return None
    flags = persistent_read_cpu.COMPILE_FLAGS
    module = cpu_extensions.load(NAME, "context_read_cpu.cpp", flags, "the context read", 40)
    if module is not None and not module.supported():
        logger.info("context-read CPU kernel off: this CPU has no packed bf16 micro-kernels (AMX)")
        return None
    return module


def usable(keys: Tensor, shift: int, dropout: bool) -> bool:
    """Whether the kernel applies to keys (B, H, T, d) (before building it): CPU, bf16, d in 32s,
    0 < shift < T, no dropout."""
    return (
        cpu_extensions.enabled()
        and not dropout
        and keys.device.type == "cpu"
        and keys.dtype == torch.bfloat16
        and keys.dim() == 4
        and keys.shape[-1] % D_MULTIPLE == 0
        and 0 < shift < keys.shape[-2]
        and kernel() is not None
    )


def _sequences(x: Tensor) -> Tensor:
    """x (B, H, T, d) with contiguous (T, d) sequences (any batch and head strides), as the kernel reads it."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


class ContextReadCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys: Tensor, values: Tensor, shift: int) -> Tensor:
        keys, values = _sequences(keys), _sequences(values)
        out, lse = kernel().forward(keys, values, shift, BLOCK_ROWS)
        ctx.save_for_backward(keys, values, out, lse)
        ctx.shift = shift
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        keys, values, out, lse = ctx.saved_tensors
        grad_keys, grad_values = kernel().backward(keys, values, out, lse, grad_out.contiguous(), ctx.shift, BLOCK_ROWS)
        return grad_keys, grad_values, None


def context_read_cpu(keys: Tensor, values: Tensor, shift: int) -> Tensor:
    """The context memory's read of bf16 keys and values (B, H, T, d), as (B, T, H d) with rows t < shift
    zero: row t is the softmax over s <= t - shift of <k_t, k_s>, weighting v_s."""
    return ContextReadCPU.apply(keys, values, shift)
