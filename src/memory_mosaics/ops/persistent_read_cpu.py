"""The persistent-memory read as a compiled CPU kernel (bf16, CPUs with AMX), with a plain fallback.

`csrc/persistent_read_cpu.cpp` computes softmax(q k^T) v for folded queries (H, N, d) against one table
(H, P, d), forward and backward, block by block of query rows, with scores and their gradients in
float32 and the products in oneDNN's bf16 micro-kernels (docs/performance.md measures it against the
fused attention kernel that is used otherwise). It is compiled on first use with PyTorch's C++
extension builder (about 40 s; cached under torch's extension folder) and used only where it can run:

- the CPU has AVX512-BF16 and packs bf16 for the micro-kernels (AMX), and the build succeeds
  (`cpu_extensions`) — otherwise `kernel()` returns None (the reason logged at INFO) and callers keep
  the fused attention path;
- bf16 queries, float32 or bf16 tables (read and rounded where they are: no bf16 copy of them is made,
  and float32 tables get their float32 gradients without a round trip through bf16), d and P multiples
  of 64, no dropout (the callers check; see `usable`).

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
BLOCK_ROWS = 128  # query rows per block; the backward's float32 scores and gradients, 2 x 128 x 256, stay in L2
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
    """Whether the kernel applies to this call (before building it): CPU, bf16 queries, float32 or bf16
    tables, sizes in 64s, no dropout."""
    return (
        cpu_extensions.enabled()
        and not dropout
        and queries.device.type == "cpu"
        and queries.dtype == torch.bfloat16
        and memory_keys.dtype in (torch.float32, torch.bfloat16)
        and queries.shape[-1] % SIZE_MULTIPLE == 0
        and memory_keys.shape[-2] % SIZE_MULTIPLE == 0
        and kernel() is not None
    )


class PersistentReadCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, values: Tensor, scale: Tensor) -> Tensor:
        queries, keys, values = queries.contiguous(), keys.contiguous(), values.contiguous()
        scale_float = scale.detach().float().contiguous()
        out, lse = kernel().forward(queries, keys, values, scale_float, BLOCK_ROWS)
        ctx.save_for_backward(queries, keys, values, scale_float, out, lse)
        ctx.scale_dtype = scale.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        queries, keys, values, scale, out, lse = ctx.saved_tensors
        grad_queries, grad_keys, grad_values, grad_scale = kernel().backward(
            queries, keys, values, scale, out, lse, grad_out.contiguous(), BLOCK_ROWS
        )
        # dK and dV come as float32 sums over every query: float32 tables (the parameters, which the kernel
        # reads directly) take them as they are; for bf16 tables autograd rounds them.
        return grad_queries, grad_keys, grad_values, grad_scale.to(ctx.scale_dtype)


def persistent_read_cpu(queries: Tensor, keys: Tensor, values: Tensor, scale: Tensor | None = None) -> Tensor:
    """scale_h softmax(queries keys^T) values for (H, N, d) bf16 queries and one (H, P, d) table, float32
    or bf16 (rounded to bf16 for the products; the tables' gradients are summed in float32). `scale` (H,),
    if given, multiplies each head's read as it is rounded to bf16 (the persistent memory's output scale)."""
    if scale is None:
        scale = torch.ones(queries.shape[0], device=queries.device)
    return PersistentReadCPU.apply(queries, keys, values, scale)
