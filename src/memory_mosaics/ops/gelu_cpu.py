"""The GPT baseline's tanh-approximate GELU as a compiled CPU kernel (float32, bf16), with a plain fallback.

`csrc/gelu_cpu.cpp` computes x (1 + tanh(u)) / 2 in its sigmoid form x sigmoid(2u) — one exponential
and one division per element, in float32 (with bf16 storage a cheaper exponential and reciprocal, and
AVX512-BF16's rounding where the CPU has it) — and its derivative, one pass each way. PyTorch's own kernel
for the tanh form took 3-4x the time of its exact GELU in bf16 (docs/performance.md), which made the
project's GPT slower than the plain nanoGPT the throughput benchmark holds it against, for a form the
authors' baseline prescribes (reference spec §5, `new_gelu`).

Built on first use (about 20 s, cached; `cpu_extensions`) on CPUs where PyTorch runs its AVX-512 code;
elsewhere, for other dtypes, or with `MOSAIC_CPU_KERNEL=0`, `gelu_tanh` is
`torch.nn.functional.gelu(x, approximate="tanh")`, the plain twin it is tested against.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from memory_mosaics.ops import cpu_extensions

logger = logging.getLogger(__name__)
NAME = "memory_mosaics_gelu_cpu"
# ATen's vector types in their AVX-512 form (without the CPU_CAPABILITY macros they are scalar loops).
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
COMPILE_FLAGS += ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
# bf16 results are rounded by one AVX512-BF16 instruction where the CPU has it (in software elsewhere).
NATIVE_ROUNDING_FLAGS = ["-mavx512bf16"]


@lru_cache(maxsize=1)
def kernel():
    """The compiled module, or None where it cannot be built or run here (the reason is logged)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        logger.info("GELU CPU kernel off: needs AVX-512 (torch's CPU capability: %s)", capability)
        return None
    flags = COMPILE_FLAGS + ([] if cpu_extensions.avx512_bf16_missing() else NATIVE_ROUNDING_FLAGS)
    return cpu_extensions.load(NAME, "gelu_cpu.cpp", flags, "the GPT's GELU", 20)


def usable(x: Tensor) -> bool:
    return (
        cpu_extensions.enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and kernel() is not None
    )


class GeluTanhCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x)
        return kernel().forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return kernel().backward(x, grad.contiguous())


def gelu_tanh(x: Tensor) -> Tensor:
    """x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2, through the compiled kernel where it runs."""
    return GeluTanhCPU.apply(x) if usable(x) else F.gelu(x, approximate="tanh")
