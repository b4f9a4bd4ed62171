"""The context memory's causal read as a compiled CPU kernel (bf16 or float32, CPUs with AMX), with a plain
fallback.

`csrc/context_read_cpu.cpp` computes, for each (batch, head) sequence of keys k and values v (B, H, T, d),

    out_t = sum_{s <= t - shift} softmax_s(<k_t, k_s>) v_s   (t >= shift),   out_t = 0   (t < shift),

forward and backward, in blocks of query rows over the admissible columns only, with scores in float32
and products in oneDNN's micro-kernels (bf16 operands in bf16; in float32 nothing is rounded and the
exponential is PyTorch's exp_u20, as in its fused attention) — the persistent read's kernel made causal
(`persistent_read_cpu.py`). The read comes out in the (B, T, H d) layout the output projection takes,
and the backward pass returns the keys' gradient with the queries' and the stored keys' parts summed,
where the fused attention path slices the keys into both, transposes the read and pads it.

Built on first use (about 40 s, cached; `cpu_extensions`) and used only where it can run: the CPU has
AVX512-BF16 and AMX, bf16 or float32 keys and values, d a multiple of 32, 0 < shift < T, no dropout
(`usable`).
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
# Query rows per block. Measured per layer (B 8, H 4, T 256 and 1,024, d 64; 15 and 5 interleaved rounds): in
# float32, where the products dominate, 64 rows (less of the diagonal block wasted) took 5.8 / 12.7 ms forward /
# backward against 6.4 / 14.6 for 128 at T 256 (66.6 / 158 vs 69.3 / 161 at T 1,024); in bf16 128 rows were as
# fast or faster (3.27 / 6.45 vs 3.30 / 6.87 ms at T 256; 29.4 / 63.0 vs 28.4 / 67.3 at T 1,024).
BLOCK_ROWS = {torch.bfloat16: 128, torch.float32: 64}
D_MULTIPLE = 32  # d must be a multiple of this (the kernel's check)
NAME = "memory_mosaics_context_read_cpu"


@lru_cache(maxsize=1)
def kernel():
    """The compiled module, or None where it cannot be built or run here (the reason is logged)."""
    missing = cpu_extensions.avx512_bf16_missing()
    if missing:
        logger.info("context-read CPU kernel off: %s", missing)
        return None
    flags = persistent_read_cpu.COMPILE_FLAGS  # the same AVX-512 code (nothing of that kernel is built here)
    module = cpu_extensions.load(NAME, "context_read_cpu.cpp", flags, "the context read", 40)
    if module is not None and not module.supported():
        logger.info("context-read CPU kernel off: this CPU has no packed bf16 micro-kernels (AMX)")
        return None
    return module


def usable(keys: Tensor, shift: int, dropout: bool) -> bool:
    """Whether the kernel applies to keys (B, H, T, d) (before building it): CPU, bf16 or float32, d in
    32s, 0 < shift < T, no dropout."""
    return (
        cpu_extensions.enabled()
        and not dropout
        and keys.device.type == "cpu"
        and keys.dtype in (torch.bfloat16, torch.float32)
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
        block_rows = BLOCK_ROWS[keys.dtype]
        out, lse = kernel().forward(keys, values, shift, block_rows)
        ctx.save_for_backward(keys, values, out, lse)
        ctx.shift, ctx.block_rows = shift, block_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        keys, values, out, lse = ctx.saved_tensors
        grad_keys, grad_values = kernel().backward(
            keys, values, out, lse, grad_out.contiguous(), ctx.shift, ctx.block_rows
        )
        return grad_keys, grad_values, None


def context_read_cpu(keys: Tensor, values: Tensor, shift: int) -> Tensor:
    """The context memory's read of keys and values (B, H, T, d), bf16 or float32, as (B, T, H d) with rows t < shift
    zero: row t is the softmax over s <= t - shift of <k_t, k_s>, weighting v_s."""
    return ContextReadCPU.apply(keys, values, shift)
