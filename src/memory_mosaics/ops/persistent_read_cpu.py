"""The persistent-memory read as a compiled CPU kernel (bf16 or float32, CPUs with AMX), with a plain fallback.

`csrc/persistent_read_cpu.cpp` computes softmax(q k^T) v for folded queries (H, N, d) against one table
(H, P, d), forward and backward, block by block of query rows, with scores and their gradients in
float32 and the products in oneDNN's micro-kernels (bf16 operands, or float32 where nothing is rounded;
docs/performance.md measures it against the fused attention kernel that is used otherwise). It is
compiled on first use with PyTorch's C++ extension builder (about 40 s; cached under torch's extension
folder) and used only where it can run:

- the CPU has AVX512-BF16 and packs bf16 for the micro-kernels (AMX), and the build succeeds
  (`cpu_extensions`) — otherwise `kernel()` returns None (the reason logged at INFO) and callers keep
  the fused attention path;
- bf16 queries with float32 or bf16 tables (read and rounded where they are: no bf16 copy of them is
  made, and float32 tables get their float32 gradients without a round trip through bf16), or float32
  queries with float32 tables; d and P multiples of 64, no dropout (the callers check; see `usable`).

`MOSAIC_CPU_KERNEL=0` turns it off. The plain twin it is tested against is
`retrieval.persistent_retrieval_reference`.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from torch import Tensor

from memory_mosaics.ops import cpu_extensions

logger = logging.getLogger(__name__)
# Query rows per block: in bf16 the backward's float32 scores and gradients, 2 x 128 x 256, stay in L2; in
# float32 64 rows were measured faster (one layer, B x T = 2,048, 15 interleaved rounds: backward 41.2 against
# 43.7 ms, as for the context read's float32 blocks).
BLOCK_ROWS = {torch.bfloat16: 128, torch.float32: 64}
# In float32 the forward pass keeps the softmax weights for the backward pass, which then skips recomputing
# them (one of its five products and the exponential), when they number at most this many (H x N x P; 128
# MiB; in buffers reused from step to step, `KeptWeights`). One layer's read at B x T = 2,048 (28 MiB kept),
# 15 interleaved rounds: forward + backward 77.8 ms against 85.1 recomputing; the benchmark's whole step
# against the fused attention read: 2.6 % faster at T = 256, 3.3 % at T = 1,024 (docs/performance.md, ninth
# round), for 112 and 448 MiB of kept weights (4 layers). Above it (T = 4,096 at batch 8) only the rows'
# log-sum-exp is kept and memory stays O(N). 0 turns keeping off.
KEEP_WEIGHTS_BUDGET = 2**25
SIZE_MULTIPLE = 64  # d and P must be multiples of this (the kernel's check)
# AVX-512 code, and ATen's vector types in their AVX-512 form (without the CPU_CAPABILITY macros they
# fall back to scalar loops: measured 27 ms instead of 4 for the elementwise part of one backward).
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
COMPILE_FLAGS += ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
NAME = "memory_mosaics_persistent_read_cpu"  # the extension's module name and build folder


@lru_cache(maxsize=1)
def kernel():
    """The compiled module, or None where it cannot be built or run here (the reason is logged)."""
    missing = cpu_extensions.avx512_bf16_missing()
    if missing:
        logger.info("persistent-read CPU kernel off: %s", missing)
        return None
    module = cpu_extensions.load(NAME, "persistent_read_cpu.cpp", COMPILE_FLAGS, "the persistent read", 40)
    if module is not None and not module.supported():
        logger.info("persistent-read CPU kernel off: this CPU has no packed bf16 micro-kernels (AMX)")
        return None
    return module


def usable(queries: Tensor, memory_keys: Tensor, dropout: bool) -> bool:
    """Whether the kernel applies to this call (before building it): CPU, bf16 queries with float32 or bf16
    tables or float32 queries with float32 tables, sizes in 64s, no dropout."""
    return (
        cpu_extensions.enabled()
        and not dropout
        and queries.device.type == "cpu"
        and (
            (queries.dtype == torch.bfloat16 and memory_keys.dtype in (torch.float32, torch.bfloat16))
            or (queries.dtype == torch.float32 and memory_keys.dtype == torch.float32)
        )
        and queries.shape[-1] % SIZE_MULTIPLE == 0
        and memory_keys.shape[-2] % SIZE_MULTIPLE == 0
        and kernel() is not None
    )


class KeptWeights:
    """Buffers for the float32 weights the forward pass keeps, reused from step to step.

    A fresh (H, N, P) tensor per layer and step costs its pages again at every step: glibc hands such
    blocks back to the system when they are freed, and the next step faults them in again (one training
    step at T = 256 float32: 40 thousand minor faults with fresh tensors, 16 thousand without keeping).
    A buffer comes back here once the backward pass that read it has run; taking it again bumps its
    version counter, so a graph that still holds it (a second backward pass with `retain_graph`) raises
    PyTorch's in-place modification error rather than reading overwritten weights. Buffers of one shape
    are kept (another shape, e.g. another sequence length, replaces them); `clear()` lets them go.
    """

    def __init__(self) -> None:
        self._free: list[Tensor] = []

    def take(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        while self._free:
            buffer = self._free.pop()
            if buffer.shape == shape and buffer.device == device:
                torch.autograd.graph.increment_version(buffer)
                return buffer
        return torch.empty(shape, device=device)

    def give_back(self, buffer: Tensor) -> None:
        if not any(buffer is free for free in self._free):  # twice after a second backward pass of one graph
            self._free.append(buffer)

    def clear(self) -> None:
        self._free.clear()


KEPT_WEIGHTS = KeptWeights()


class PersistentReadCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, values: Tensor, scale: Tensor, keep: bool) -> Tensor:
        queries, keys, values = queries.contiguous(), keys.contiguous(), values.contiguous()
        scale_float = scale.detach().float().contiguous()
        block_rows = BLOCK_ROWS[queries.dtype]
        heads, rows, slots = queries.shape[0], queries.shape[1], keys.shape[1]
        kept = KEPT_WEIGHTS.take((heads, rows, slots), queries.device) if keep else None
        out, lse = kernel().forward(queries, keys, values, scale_float, block_rows, kept)
        ctx.save_for_backward(queries, keys, values, scale_float, out, lse, kept)
        ctx.scale_dtype, ctx.block_rows = scale.dtype, block_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        queries, keys, values, scale, out, lse, kept = ctx.saved_tensors
        grad_queries, grad_keys, grad_values, grad_scale = kernel().backward(
            queries, keys, values, scale, out, lse, grad_out.contiguous(), kept, ctx.block_rows
        )
        if kept is not None:
            KEPT_WEIGHTS.give_back(kept)
        # dK and dV come as float32 sums over every query: float32 tables (the parameters, which the kernel
        # reads directly) take them as they are; for bf16 tables autograd rounds them.
        return grad_queries, grad_keys, grad_values, grad_scale.to(ctx.scale_dtype), None


def persistent_read_cpu(queries: Tensor, keys: Tensor, values: Tensor, scale: Tensor | None = None) -> Tensor:
    """scale_h softmax(queries keys^T) values for (H, N, d) queries and one (H, P, d) table: bf16 queries
    with a float32 or bf16 table (rounded to bf16 for the products), or float32 queries with a float32
    table; the tables' gradients are summed in float32. `scale` (H,), if given, multiplies each head's read
    as it is written (the persistent memory's output scale)."""
    if scale is None:
        scale = torch.ones(queries.shape[0], device=queries.device)
    heads, rows, slots = queries.shape[0], queries.shape[1], keys.shape[1]
    differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in (queries, keys, values, scale))
    keep = queries.dtype == torch.float32 and differentiated and heads * rows * slots <= KEEP_WEIGHTS_BUDGET
    return PersistentReadCPU.apply(queries, keys, values, scale, keep)
