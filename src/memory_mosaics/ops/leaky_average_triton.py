"""The leaky average's scan as a Triton kernel, for GPUs.

    forward:  y_t = x_t + a_h y_{t-1},   y_{-1} = initial (or 0)     a_h = exp(-beta_h)
    reverse:  y_s = x_s + a_h y_{s+1},   y_T = 0                       (the backward pass's scan)

One program owns one (sequence, head) and a block of channels, and walks the time axis in chunks:
a chunk is loaded as a (CHUNK, BLOCK_D) tile, scanned with `tl.associative_scan` (pairs (decay,
value) combine as (a1 a2, a2 x1 + x2)), and the state carried from the previous chunk is added with
weight a^(i+1) at row i. The reverse scan is the same kernel reading the time axis backwards, so
`LeakyAverage`'s backward pass (ops/leaky_average.py) uses it unchanged. Sums run in float32 (float64
for float64 inputs); the output has the input's dtype.

Triton is optional: `available()` says whether it imported. `leaky_average` calls `scan` for CUDA
tensors when it is; the environment variable MOSAIC_TRITON=0 turns it off (for A/B measurements).
With TRITON_INTERPRET=1 set before Triton is imported, the kernel runs on CPU tensors through Triton's
interpreter (how the tests check it on machines without a GPU).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is not a dependency: the torch scan is the fallback
    triton = None


def available() -> bool:
    return triton is not None


def enabled_for(x: Tensor) -> bool:
    """Use the kernel for this tensor? CUDA, Triton imported, not switched off by MOSAIC_TRITON=0."""
    return triton is not None and x.is_cuda and os.environ.get("MOSAIC_TRITON", "1") != "0"


if triton is not None:

    @triton.jit
    def _combine(decay_left, value_left, decay_right, value_right):
        return decay_left * decay_right, decay_right * value_left + value_right

    @triton.jit
    def _leaky_scan_kernel(
        x_ptr,
        y_ptr,
        initial_ptr,
        beta_ptr,
        heads,
        length,
        dim,
        sx_b,
        sx_h,
        sx_t,
        sx_d,
        sy_b,
        sy_h,
        sy_t,
        sy_d,
        si_b,
        si_h,
        si_d,
        REVERSE: tl.constexpr,
        HAS_INITIAL: tl.constexpr,
        ACC: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        sequence_head = tl.program_id(0)
        seq = sequence_head // heads
        head = sequence_head % heads
        channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        channel_ok = channels < dim
        rows = tl.arange(0, CHUNK)

        beta = tl.load(beta_ptr + head).to(ACC)
        decays = tl.full((CHUNK, BLOCK_D), 1.0, ACC) * tl.exp(-beta)
        carry_weight = tl.exp(-beta * (rows + 1).to(ACC))[:, None]  # a^(i+1): the state's weight at row i
        if HAS_INITIAL:
            carry = tl.load(initial_ptr + seq * si_b + head * si_h + channels * si_d, mask=channel_ok, other=0.0)
            carry = carry.to(ACC)
        else:
            carry = tl.zeros((BLOCK_D,), ACC)

        x_base = x_ptr + seq * sx_b + head * sx_h + channels[None, :] * sx_d
        y_base = y_ptr + seq * sy_b + head * sy_h + channels[None, :] * sy_d
        start = 0
        while start < length:  # (not `range`: Triton's interpreter cannot index with a runtime scalar)
            step = start + rows
            time = length - 1 - step if REVERSE else step
            ok = (step < length)[:, None] & channel_ok[None, :]
            x = tl.load(x_base + time[:, None] * sx_t, mask=ok, other=0.0).to(ACC)
            _, y = tl.associative_scan((decays, x), 0, _combine)
            y = y + carry_weight * carry[None, :]
            tl.store(y_base + time[:, None] * sy_t, y.to(y_ptr.dtype.element_ty), mask=ok)
            carry = tl.sum(tl.where((rows == CHUNK - 1)[:, None], y, 0.0), axis=0)  # the last row
            start += CHUNK


def scan(x: Tensor, beta: Tensor, reverse: bool = False, initial: Tensor | None = None, chunk: int = 64) -> Tensor:
    """The leaky scan of x (..., H, T, D) with decays exp(-beta), beta (H,); no autograd.

    Forward in time with optional `initial` (..., H, D), or backward in time (`reverse`, no initial),
    the same two scans as `leaky_average._scan`. Returns a contiguous tensor of x's shape and dtype.
    `chunk` (a power of two) is the number of time steps a program scans at once.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use memory_mosaics.ops.leaky_average instead")
    if reverse and initial is not None:
        raise ValueError("the reverse scan takes no initial state")
    heads, length, dim = x.shape[-3:]
    flat = x.reshape(-1, heads, length, dim)  # a view whenever the lead dimensions allow it
    y = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    if initial is not None:
        initial_flat = initial.to(x.dtype).reshape(-1, heads, dim)
        initial_strides = initial_flat.stride()
    else:
        initial_flat, initial_strides = beta, (0, 0, 0)  # never read
    block_d = min(triton.next_power_of_2(dim), 32)
    grid = (flat.shape[0] * heads, triton.cdiv(dim, block_d))
    _leaky_scan_kernel[grid](
        flat,
        y,
        initial_flat,
        beta.contiguous(),
        heads,
        length,
        dim,
        *flat.stride(),
        *y.stride(),
        *initial_strides,
        REVERSE=reverse,
        HAS_INITIAL=initial is not None,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
        CHUNK=chunk,
        BLOCK_D=block_d,
    )
    return y.view(x.shape)
