"""Key and value features as compiled CPU kernels (float32 and bf16), with the plain path as fallback.

`csrc/features_cpu.cpp` computes, one (batch, head) sequence at a time and in float32,

    keys    k_t = scale_h s_t / |s_t|,  s_t = x_t + exp(-decay_h) s_{t-1}     (leaky average, normalised)
    values  v_t = scale_h u_t / |u_t|,  u_t = lerp(p_{t+m}, p_t, mix_h)        (look-ahead mix, normalised)

forward and backward, reading the projections x, p in the (B, T, C) layout the linear layer wrote and
writing (B, H, T, d) features stored head-major. Where PyTorch records a dozen elementwise operators
and matrix products for each (the chunked scan, the norm, the scaling, and their backward passes), the
kernel reads the sequence once and writes it once (docs/performance.md, fifth round).

Used on CPU tensors of float32 or bf16 when the build succeeds (`cpu_extensions`: built on first use,
about 30 s, then cached; `MOSAIC_CPU_KERNEL=0` turns it off). Plain twins, which the tests compare it
with: `leaky_average_reference` + `scaled_normalize_reference` for keys; `torch.lerp` +
`scaled_normalize_reference` for values.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from memory_mosaics.ops import cpu_extensions

NAME = "memory_mosaics_features_cpu"


def compile_flags() -> list[str]:
    """Plain loops the compiler vectorises, for the widest vectors torch itself uses on this CPU."""
    flags = ["-O3", "-fopenmp-simd"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    return flags


@lru_cache(maxsize=1)
def kernel():
    """The compiled module, or None where it cannot be built here (the reason is logged)."""
    return cpu_extensions.load(NAME, "features_cpu.cpp", compile_flags(), "the key and value features", 30)


def usable(projected: Tensor) -> bool:
    """Whether the kernels apply to this projection (B, T, C): CPU, float32 or bf16, built."""
    return (
        cpu_extensions.enabled()
        and projected.device.type == "cpu"
        and projected.dtype in (torch.float32, torch.bfloat16)
        and projected.dim() == 3
        and projected.stride(-1) == 1
        and kernel() is not None
    )


def _per_head(parameter: Tensor) -> Tensor:
    return parameter.detach().float().contiguous()


class KeyFeaturesCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected: Tensor, decay: Tensor, scale: Tensor, heads: int) -> Tensor:
        decay_float, scale_float = _per_head(decay), _per_head(scale)  # kept: the backward pass needs them too
        ctx.save_for_backward(projected, decay_float, scale_float)
        ctx.heads, ctx.dtypes = heads, (decay.dtype, scale.dtype)
        return kernel().key_forward(projected, heads, decay_float, scale_float)

    @staticmethod
    def backward(ctx, grad: Tensor):
        projected, decay, scale = ctx.saved_tensors
        grad_x, decay_dots, scale_dots = kernel().key_backward(grad, projected, ctx.heads, decay, scale)
        # d s_t / d a = s_{t-1} + a d s_{t-1} / d a, so dL/da = sum_t <dL/ds_t, s_{t-1}>; a = exp(-decay).
        grad_decay = -torch.exp(-decay) * decay_dots.sum(0)
        decay_dtype, scale_dtype = ctx.dtypes
        return grad_x, grad_decay.to(decay_dtype), scale_dots.sum(0).to(scale_dtype), None


class ValueFeaturesCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected: Tensor, mix: Tensor, scale: Tensor, heads: int, shift: int) -> Tensor:
        mix_float, scale_float = _per_head(mix), _per_head(scale)  # kept: the backward pass needs them too
        ctx.save_for_backward(projected, mix_float, scale_float)
        ctx.heads, ctx.shift, ctx.dtypes = heads, shift, (mix.dtype, scale.dtype)
        return kernel().value_forward(projected, heads, shift, mix_float, scale_float)

    @staticmethod
    def backward(ctx, grad: Tensor):
        projected, mix, scale = ctx.saved_tensors
        grad_p, mix_dots, scale_dots = kernel().value_backward(grad, projected, ctx.heads, ctx.shift, mix, scale)
        mix_dtype, scale_dtype = ctx.dtypes
        return grad_p, mix_dots.sum(0).to(mix_dtype), scale_dots.sum(0).to(scale_dtype), None, None


def key_features(projected: Tensor, heads: int, decay: Tensor, scale: Tensor) -> Tensor:
    """scale_h * normalize(leaky average with decay_h) of projected (B, T, C) -> (B, H, T, C/H)."""
    return KeyFeaturesCPU.apply(projected, decay, scale, heads)


def value_features(projected: Tensor, heads: int, shift: int, mix: Tensor, scale: Tensor) -> Tensor:
    """scale_h * normalize(lerp(p_{t+shift}, p_t, mix_h)) of projected (B, T, C) -> (B, H, T, C/H)."""
    return ValueFeaturesCPU.apply(projected, mix, scale, heads, shift)
