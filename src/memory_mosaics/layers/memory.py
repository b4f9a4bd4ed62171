"""The elementary memories of a Memory Mosaic, in the order of the paper.

An associative memory stores pairs (key, value) and answers a query by Gaussian kernel smoothing over
the stored keys. In a Memory Mosaic both are trainable features of the input sequence:

- the key k_t summarises the past: a linear map, a leaky (exponentially decaying) average over time
  with a learned decay per head, L2 normalisation, and a learned scale per head (the kernel bandwidth);
- the value v_t looks one step ahead: it mixes the projections of x_t and x_{t+1}, then is normalised
  and scaled.

A `ContextMemory` stores the pairs of the current sequence and queries them with k_t itself; a
`PersistentMemory` stores pairs learned in training and replaces the transformer's feed-forward layer.

On CPUs (float32, bf16) the fast path computes each feature in one compiled pass (`ops/features_cpu.py`);
elsewhere, or if it cannot be built, it chains the leaky average, the mix and `scaled_normalize`. On CPUs
with AMX the reads are compiled kernels too (the context read in float32 and bf16, `ops/context_read_cpu.py`;
the persistent read too, `ops/persistent_read_cpu.py`); elsewhere, and with dropout on the retrieval
weights, they go through `scaled_dot_product_attention`.

Parametrisations, initialisations and clamps follow the authors' code (reference spec §1–§3):
    leak      beta_h = 10 |theta_h|,              theta_0 = linspace(0.5, 5, H) / 10
    key scale s_h = exp(min(10 rho_h, 5)) ** p,    rho_0 = 0.1, p = 1 (context) or 2 (persistent)
    value mix u_t = (1 - lambda_h) W x_{t+m} + lambda_h W x_t,   lambda_0 ~ U(0, 1), unconstrained
    value/output scale exp(10 gamma_h),           gamma_0 = -0.05
The clamp at 5 bounds the retrieval logits by e^10 < 65504, which keeps fp16 finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memory_mosaics.ops import (
    context_read,
    context_read_cpu,
    context_retrieval_reference,
    features_cpu,
    leading_rows,
    leaky_average,
    leaky_average_reference,
    persistent_retrieval,
    persistent_retrieval_reference,
    scaled_normalize,
    scaled_normalize_reference,
)

IMPLEMENTATIONS = ("fast", "reference")
VALUE_KINDS = ("lowrank", "kernel2")
KEY_SCALE_LOG_CLAMP = 5.0


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, C) -> (B, H, T, C/H); head h owns channels [h*d, (h+1)*d)."""
    batch, length, channels = x.shape
    return x.view(batch, length, n_head, channels // n_head).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def look_ahead(x: Tensor, shift: int) -> Tensor:
    """x_{t+shift} at position t along dim 1 of (B, T, C), zero past the end of the sequence."""
    return F.pad(x[:, shift:], (0, 0, 0, min(shift, x.shape[1])))


def normalize_and_scale(x: Tensor, scale: Tensor, impl: str = "fast") -> Tensor:
    """scale_h * x / |x| over the last dim of (B, H, ..., d); a zero vector stays zero."""
    return scaled_normalize_reference(x, scale) if impl == "reference" else scaled_normalize(x, scale)


def init_linear(linear: nn.Linear, std: float | None = None) -> None:
    """The authors' init: N(0, 1/sqrt(fan_in)) unless told otherwise, zero bias."""
    nn.init.normal_(linear.weight, mean=0.0, std=std if std is not None else linear.in_features**-0.5)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class KeyFeatureExtractor(nn.Module):
    """k_t = s_h^p * normalize(sum_{s<=t} exp(-beta_h (t-s)) W x_s), per head. Output (B, H, T, d)."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        bias: bool = False,
        scale_power: int = 1,
        impl: str = "fast",
        chunk_size: int = 32,
    ):
        super().__init__()
        self.n_head = n_head
        self.scale_power = scale_power
        self.impl = impl
        self.chunk_size = chunk_size
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.leak = nn.Parameter(torch.linspace(0.5, 5.0, n_head) / 10)
        self.bandwidth = nn.Parameter(torch.full((n_head,), 0.1))
        init_linear(self.proj)

    def decay(self) -> Tensor:
        """beta_h >= 0: the per-step leak of the average is exp(-beta_h)."""
        return 10 * self.leak.abs()

    def scale(self) -> Tensor:
        """s_h^p, with the clamp applied before the power as in the authors' code."""
        return torch.exp(torch.clamp(10 * self.bandwidth, max=KEY_SCALE_LOG_CLAMP)) ** self.scale_power

    def finish(self, averaged: Tensor) -> Tensor:
        """Normalise a leaky-averaged projection (B, H, ..., d) and apply the per-head scale."""
        return normalize_and_scale(averaged, self.scale(), self.impl)

    def average(self, projected: Tensor) -> Tensor:
        """The leaky average of projected inputs (B, H, T, d), each head with its own decay."""
        if self.impl == "reference":
            return leaky_average_reference(projected, self.decay())
        return leaky_average(projected, self.decay(), chunk_size=self.chunk_size)

    def forward(self, x: Tensor, projected: Tensor | None = None) -> Tensor:
        """Keys of x (B, T, C). `projected`, if given, is self.proj(x) computed by the caller (the
        context memory fuses it with the value projection); hooks still see this module's output."""
        projected = self.proj(x) if projected is None else projected
        if self.impl != "reference" and features_cpu.usable(projected):  # one compiled pass on CPUs
            return features_cpu.key_features(projected, self.n_head, self.decay(), self.scale())
        return self.finish(self.average(split_heads(projected, self.n_head)))


class ValueFeatureExtractor(nn.Module):
    """v_t = exp(10 gamma_h) * normalize(u_t), u_t built from x_t and x_{t+m}. Output (B, H, T, d).

    kind "lowrank" (the authors' default): u_t = (1 - lambda_h) W x_{t+m} + lambda_h W x_t.
    kind "kernel2": a full kernel-2 convolution, u_t = W_0 x_t + W_1 x_{t+m} (+ b).
    """

    def __init__(
        self, n_embd: int, n_head: int, bias: bool = False, shift: int = 1, kind: str = "lowrank", impl: str = "fast"
    ):
        super().__init__()
        self.n_head = n_head
        self.shift = shift
        self.kind = kind
        self.impl = impl
        self.value_scale = nn.Parameter(torch.full((n_head,), -0.05))
        if kind == "lowrank":
            self.proj = nn.Linear(n_embd, n_embd, bias=bias)
            self.mix = nn.Parameter(torch.rand(n_head))
            init_linear(self.proj)
        else:
            # Both taps in one matrix product; rows [:C] act on x_t, rows [C:] on x_{t+m}.
            self.proj = nn.Linear(n_embd, 2 * n_embd, bias=False)
            self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
            init_linear(self.proj, std=(2 * n_embd) ** -0.5)  # a conv's fan-in: C channels x 2 taps

    def mixed(self, projected_now: Tensor, projected_next: Tensor) -> Tensor:
        """u from the projections of x_t and x_{t+m}, both (B, H, ..., d); lowrank only."""
        mix = self.mix.to(projected_now.dtype).view(-1, *([1] * (projected_now.dim() - 2)))
        return torch.lerp(projected_next, projected_now, mix)  # (1 - mix) * next + mix * now, one pass

    def finish(self, unnormalised: Tensor) -> Tensor:
        return normalize_and_scale(unnormalised, torch.exp(10 * self.value_scale), self.impl)

    def forward(self, x: Tensor, projected: Tensor | None = None) -> Tensor:
        """Values of x (B, T, C); `projected`, if given, is self.proj(x) computed by the caller."""
        projected = self.proj(x) if projected is None else projected
        if self.kind == "lowrank" and self.impl != "reference" and features_cpu.usable(projected):
            scale = torch.exp(10 * self.value_scale)
            return features_cpu.value_features(projected, self.n_head, self.shift, self.mix, scale)
        if self.kind == "lowrank":
            ahead = look_ahead(projected, self.shift)
            unnormalised = self.mixed(split_heads(projected, self.n_head), split_heads(ahead, self.n_head))
        else:
            now, next_tap = projected.chunk(2, dim=-1)
            combined = now + look_ahead(next_tap, self.shift)
            if self.bias is not None:
                combined = combined + self.bias
            unnormalised = split_heads(combined, self.n_head)
        return self.finish(unnormalised)


class ContextMemory(nn.Module):
    """Stores (k_s, v_s) of the current sequence; position t queries with k_t the pairs s <= t - m.

    Output (B, T, C); position t < m has nothing to read and outputs exactly zero (plus c_proj's bias).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_layer: int = 1,
        dropout: float = 0.0,
        bias: bool = False,
        shift: int = 1,
        value_kind: str = "lowrank",
        impl: str = "fast",
        chunk_size: int = 32,
    ):
        super().__init__()
        self.shift = shift
        self.impl = impl
        self.dropout = dropout
        self.key = KeyFeatureExtractor(n_embd, n_head, bias, scale_power=1, impl=impl, chunk_size=chunk_size)
        self.value = ValueFeatureExtractor(n_embd, n_head, bias, shift=shift, kind=value_kind, impl=impl)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        init_linear(self.c_proj, std=(n_embd * n_layer) ** -0.5)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl != "reference":
            return self.resid_dropout(self._fast_forward(x))
        keys, values = self.key(x), self.value(x)
        read = context_retrieval_reference(keys, values, self.shift, self.dropout, self.training)
        return self.resid_dropout(self.c_proj(merge_heads(read)))

    def _fast_forward(self, x: Tensor) -> Tensor:
        """The same function with less traffic: one matrix product for the key and value projections
        (the key and value modules still run, so hooks on them see their outputs), and the zero rows
        t < m written after the output projection rather than before it."""
        length, channels, shift = x.shape[1], x.shape[2], self.shift
        if length <= shift:  # no position has a pair to read
            return self.c_proj(torch.zeros_like(x))
        key, value = self.key, self.value
        weight = torch.cat([key.proj.weight, value.proj.weight])
        bias = None
        if key.proj.bias is not None:  # kernel2 values carry their bias after the taps are combined
            value_bias = value.proj.bias
            if value_bias is None:
                value_bias = key.proj.bias.new_zeros(value.proj.out_features)
            bias = torch.cat([key.proj.bias, value_bias])
        projected = F.linear(x, weight, bias)  # (B, T, C + C), or (B, T, C + 2C) for kernel2
        # `split`, not two slices: its backward pass writes the joint gradient once (a cat), where
        # each slice's would fill a zero (B, T, 2C) tensor, copy into it, and the two be added.
        key_part, value_part = projected.split([channels, projected.shape[-1] - channels], dim=-1)
        keys = key(x, projected=key_part)
        values = value(x, projected=value_part)
        if context_read_cpu.usable(keys, shift, dropout=self.training and self.dropout > 0):
            # float32 or bf16 on CPUs with AMX: the compiled kernel writes the read in c_proj's layout, rows
            # t < m zero
            return self.c_proj(context_read_cpu.context_read_cpu(keys, values, shift))
        retrieved = context_read(keys, leading_rows(values, length - shift), shift, self.dropout, self.training)
        out = F.linear(merge_heads(retrieved), self.c_proj.weight)
        out = F.pad(out, (0, 0, shift, 0))  # rows t < shift read nothing: c_proj(0) = its bias
        return out if self.c_proj.bias is None else out + self.c_proj.bias


class PersistentMemory(nn.Module):
    """Pairs learned in training: `count` tables of `size` slots per head, queried with a leaky key.

    The query uses the squared key scale because the stored keys carry no scale of their own; the
    tables are unnormalised, so each slot also has a learned prior weight exp(s^2 |m_j|^2 / 2).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        size: int,
        count: int = 1,
        n_layer: int = 1,
        dropout: float = 0.0,
        bias: bool = False,
        impl: str = "fast",
        chunk_size: int = 32,
    ):
        super().__init__()
        head_dim = n_embd // n_head
        self.n_head = n_head
        self.impl = impl
        self.dropout = dropout
        self.key = KeyFeatureExtractor(n_embd, n_head, bias, scale_power=2, impl=impl, chunk_size=chunk_size)
        self.memory_keys = nn.Parameter(torch.randn(count, n_head, size, head_dim) / math.sqrt(head_dim))
        self.memory_values = nn.Parameter(torch.randn(count, n_head, size, head_dim) / math.sqrt(head_dim))
        self.out_scale = nn.Parameter(torch.full((n_head,), -0.05))
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        init_linear(self.c_proj, std=(n_embd * n_layer) ** -0.5)
        self.resid_dropout = nn.Dropout(dropout)

    def read(self, queries: Tensor) -> Tensor:
        """Retrieve for queries (B, H, T, d) and apply the output scale; returns (B, T, C) before c_proj."""
        out_scale = torch.exp(10 * self.out_scale)
        if self.impl == "reference":
            read = persistent_retrieval_reference(
                queries, self.memory_keys, self.memory_values, self.dropout, self.training
            )
            return merge_heads(read * out_scale[:, None, None].to(read.dtype))
        # The output scale is per head, so it can scale the (small) value tables instead of the reads, or
        # ride in the compiled kernel's rounding of its read.
        read = persistent_retrieval(
            queries, self.memory_keys, self.memory_values, self.dropout, self.training, value_scale=out_scale
        )
        return merge_heads(read)

    def forward(self, x: Tensor) -> Tensor:
        return self.resid_dropout(self.c_proj(self.read(self.key(x))))
