"""Gated linear attention (GLA; Yang, Wang, Shen, Panda & Kim, 2024), in plain PyTorch.

Per head, a matrix state S (key_dim x value_dim) is decayed row-wise by a data-dependent gate
α_t ∈ (0, 1)^key_dim and updated with the outer product of key and value:

    S_t = diag(α_t) S_{t-1} + k_t^T v_t,      o_t = q_t S_t.

α_t = sigmoid(x_t W_1 W_2 + b)^(1/τ) (low rank, temperature τ = 16 as in the paper). The head
outputs are normalised per head, gated by SiLU(x W_g) and projected back.

Two forms compute the same o: `gla_recurrent` (the reference, one step at a time) and
`gla_chunked` (attention-like inside chunks, the state carried between chunks). Every
exponential in the chunked form is of a non-positive number, so it is stable for any gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import BaselineConfig, SequenceLM, at_least_float32, require, residual_stack

GLA_FORMS = ("recurrent", "chunked")


@dataclass
class GLAConfig(BaselineConfig):
    n_head: int = 4
    key_dim: int | None = None  # total over heads; None: n_embd // 2 rounded down to n_head's multiple
    gate_rank: int = 16
    gate_temperature: float = 16.0
    mlp_ratio: int = 4
    form: str = "chunked"
    chunk_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_head", "gate_rank", "chunk_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, self, name, "an integer >= 1", value)
        require(self.n_embd % self.n_head == 0, self, "n_embd", f"a multiple of n_head={self.n_head}", self.n_embd)
        if self.key_dim is None:
            self.key_dim = max(self.n_head, self.n_embd // 2 // self.n_head * self.n_head)
        require(
            isinstance(self.key_dim, int) and self.key_dim >= 1 and self.key_dim % self.n_head == 0,
            self, "key_dim", f"a positive multiple of n_head={self.n_head}", self.key_dim,
        )  # fmt: skip
        require(self.mlp_ratio >= 0, self, "mlp_ratio", "an integer >= 0", self.mlp_ratio)
        require(self.gate_temperature > 0, self, "gate_temperature", "> 0", self.gate_temperature)
        require(self.form in GLA_FORMS, self, "form", f"one of {GLA_FORMS}", self.form)


def gla_recurrent(q, k, v, log_gate):
    """Reference. q, k, log_gate: (batch, head, time, key_dim); v: (batch, head, time,
    value_dim); log_gate = log α <= 0. Returns o: (batch, head, time, value_dim)."""
    batch, heads, _, key_dim = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    outputs = []
    steps = zip(q.unbind(2), k.unbind(2), v.unbind(2), log_gate.unbind(2), strict=True)
    for q_t, k_t, v_t, log_gate_t in steps:
        state = log_gate_t.exp().unsqueeze(-1) * state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outputs.append((q_t.unsqueeze(-2) @ state).squeeze(-2))
    return torch.stack(outputs, dim=2)


def gla_chunked(q, k, v, log_gate, chunk_size: int = 16):
    """Same result as `gla_recurrent`. Inside a chunk, with b_t the cumulative log gate since the
    chunk start, o_t = Σ_{s<=t} (Σ_i q_ti k_si exp(b_ti - b_si)) v_s + (q_t ⊙ exp(b_t)) S_prev,
    and the chunk's end state is diag(exp(b_L)) S_prev + Σ_s (k_s ⊙ exp(b_L - b_s))^T v_s."""
    batch, heads, T, key_dim = q.shape
    pad = (-T) % chunk_size  # zero padding at the end cannot change earlier positions
    q, k, v, log_gate = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, log_gate))
    n_chunks = (T + pad) // chunk_size
    q, k, v, log_gate = (t.view(batch, heads, n_chunks, chunk_size, -1) for t in (q, k, v, log_gate))

    cum_gate = log_gate.cumsum(dim=3)  # b_t, (batch, head, chunk, L, key_dim), non-increasing
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    gap = cum_gate.unsqueeze(4) - cum_gate.unsqueeze(3)  # b_t - b_s, indexed [t, s]
    gap = gap.masked_fill(~causal.unsqueeze(-1), float("-inf"))  # exp -> 0 above the diagonal
    scores = (q.unsqueeze(4) * k.unsqueeze(3) * gap.exp()).sum(-1)  # (batch, head, chunk, t, s)
    intra = scores @ v

    to_chunk_end = (cum_gate[:, :, :, -1:] - cum_gate).exp()  # exp(b_L - b_s) <= 1
    chunk_updates = (k * to_chunk_end).transpose(-1, -2) @ v  # (batch, head, chunk, key, value)
    chunk_decay = cum_gate[:, :, :, -1].exp().unsqueeze(-1)  # exp(b_L), (batch, head, chunk, key, 1)
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    inter = []
    for c in range(n_chunks):  # few chunks: a plain loop carries the state
        inter.append((q[:, :, c] * cum_gate[:, :, c].exp()) @ state)
        state = chunk_decay[:, :, c] * state + chunk_updates[:, :, c]
    out = intra + torch.stack(inter, dim=2)
    return out.reshape(batch, heads, n_chunks * chunk_size, -1)[:, :, :T]


class GatedLinearAttention(nn.Module):
    def __init__(self, config: GLAConfig):
        super().__init__()
        d, dk = config.n_embd, config.key_dim
        self.config = config
        self.q_proj = nn.Linear(d, dk, bias=False)
        self.k_proj = nn.Linear(d, dk, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.g_proj = nn.Linear(d, d, bias=False)
        self.gate_down = nn.Linear(d, config.gate_rank, bias=False)
        self.gate_up = nn.Linear(config.gate_rank, dk)
        self.head_norm = nn.LayerNorm(d // config.n_head)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, T, d = x.shape
        heads = self.config.n_head

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, H*e) -> (B, H, T, e), >= float32
            return at_least_float32(t).view(batch, T, heads, -1).transpose(1, 2)

        q = split_heads(self.q_proj(x)) * (self.config.key_dim // heads) ** -0.5
        k, v = split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        log_gate = split_heads(F.logsigmoid(at_least_float32(self.gate_up(self.gate_down(x)))))
        log_gate = log_gate / self.config.gate_temperature
        if self.config.form == "recurrent":
            o = gla_recurrent(q, k, v, log_gate)
        else:
            o = gla_chunked(q, k, v, log_gate, self.config.chunk_size)
        o = self.head_norm(o).transpose(1, 2).reshape(batch, T, d)
        return self.out_proj((o * F.silu(at_least_float32(self.g_proj(x)))).to(x.dtype))


class GLALM(SequenceLM):
    """Stack of pre-LayerNorm residual blocks: gated linear attention, then an MLP."""

    model_type = "gla"
    config_class = GLAConfig

    def __init__(self, config: GLAConfig):
        super().__init__(config, residual_stack(lambda: GatedLinearAttention(config), config, config.mlp_ratio))
