"""A selective state-space model in the style of Mamba (Gu & Dao, 2023), in plain PyTorch.

Each block: in_proj -> (x, z); x -> depthwise causal conv -> SiLU; from x the input-dependent
step Δ (low rank, softplus), input matrix B_t and output matrix C_t; a diagonal A per (channel,
state); the scan

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t,      y_t = C_t · h_t + D ⊙ x_t,

gated by SiLU(z) and projected back. Two forms of the scan compute the same thing:
`selective_scan_sequential` (one step at a time; the reference, and the faster one on CPU) and
`selective_scan_chunked` (a log-depth parallel scan inside chunks and across chunk ends: fewer,
larger operations, meant for GPUs; about 4x slower than the sequential form on CPU, where memory
traffic dominates). `scan="auto"` picks the sequential form on CPU and the chunked one elsewhere;
their agreement (outputs and gradients) is tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import BaselineConfig, SequenceLM, at_least_float32, require, residual_stack

SCAN_FORMS = ("auto", "sequential", "chunked")


@dataclass
class MambaConfig(BaselineConfig):
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(n_embd / 16), as in Mamba
    dt_min: float = 1e-3
    dt_max: float = 0.1
    scan: str = "auto"
    chunk_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.n_embd / 16)
        for name in ("d_state", "d_conv", "expand", "dt_rank", "chunk_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, self, name, "an integer >= 1", value)
        require(0 < self.dt_min <= self.dt_max, self, "dt_min", "in (0, dt_max]", self.dt_min)
        require(self.scan in SCAN_FORMS, self, "scan", f"one of {SCAN_FORMS}", self.scan)

    @property
    def d_inner(self) -> int:
        return self.expand * self.n_embd


def _discretize(x, delta, A, B):
    """exp(Δ A) and Δ B x, both (batch, time, channel, state). B uses Mamba's Euler step."""
    decay = torch.exp(delta.unsqueeze(-1) * A)
    inputs = (delta * x).unsqueeze(-1) * B.unsqueeze(2)
    return decay, inputs


def selective_scan_sequential(x, delta, A, B, C):
    """Reference scan. x, delta: (batch, time, channel); A: (channel, state); B, C: (batch,
    time, state). Returns y = C_t · h_t, (batch, time, channel), without the D skip."""
    decay, inputs = _discretize(x, delta, A, B)
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    states = []
    # unbind, not decay[:, t]: the backward of indexing writes a full-size zero tensor per step.
    for decay_t, input_t in zip(decay.unbind(1), inputs.unbind(1), strict=True):
        h = decay_t * h + input_t
        states.append(h)
    return torch.einsum("btdn,btn->btd", torch.stack(states, dim=1), C)


def parallel_linear_scan(decay: torch.Tensor, inputs: torch.Tensor, dim: int):
    """Solve h_t = decay_t * h_{t-1} + inputs_t (h_{-1} = 0) along `dim` in log2(n) rounds
    (Hillis-Steele). Returns (products of decays up to t, h_t). Only multiplies by decays <= 1,
    so it cannot overflow, unlike the cumulative-sum-of-exponentials trick."""
    n = decay.shape[dim]

    def shifted(t: torch.Tensor, offset: int, fill: float) -> torch.Tensor:
        """t moved `offset` steps later along dim, the first `offset` entries set to `fill`."""
        head = torch.full_like(t.narrow(dim, 0, offset), fill)
        return torch.cat([head, t.narrow(dim, 0, n - offset)], dim)

    offset = 1
    while offset < n:  # after this round, entry t has combined the 2*offset steps ending at t
        inputs = inputs + decay * shifted(inputs, offset, 0.0)
        decay = decay * shifted(decay, offset, 1.0)
        offset *= 2
    return decay, inputs


def selective_scan_chunked(x, delta, A, B, C, chunk_size: int = 32):
    """Same result as `selective_scan_sequential`: scan inside chunks from a zero state, scan
    the chunk-end states across chunks, then add each chunk's carried-in state."""
    batch, T, channels = x.shape
    decay, inputs = _discretize(x, delta, A, B)
    pad = (-T) % chunk_size  # padding at the end cannot change earlier positions
    decay = F.pad(decay, (0, 0, 0, 0, 0, pad), value=1.0)
    inputs = F.pad(inputs, (0, 0, 0, 0, 0, pad))
    shape = (batch, (T + pad) // chunk_size, chunk_size, channels, A.shape[1])
    decay_so_far, local_states = parallel_linear_scan(decay.view(shape), inputs.view(shape), dim=2)
    _, chunk_end_states = parallel_linear_scan(decay_so_far[:, :, -1], local_states[:, :, -1], dim=1)
    carried_in = F.pad(chunk_end_states[:, :-1], (0, 0, 0, 0, 1, 0))  # zero before chunk 0
    states = local_states + decay_so_far * carried_in.unsqueeze(2)
    states = states.reshape(batch, T + pad, channels, A.shape[1])[:, :T]
    return torch.einsum("btdn,btn->btd", states, C)


class MambaMixer(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        d_inner, n_state, rank = config.d_inner, config.d_state, config.dt_rank
        self.config = config
        self.in_proj = nn.Linear(config.n_embd, 2 * d_inner, bias=False)
        self.conv = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner, padding=config.d_conv - 1)
        self.x_proj = nn.Linear(d_inner, rank + 2 * n_state, bias=False)
        self.dt_proj = nn.Linear(rank, d_inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n_state + 1.0)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_log._no_weight_decay = True  # Mamba's convention: no weight decay on A and D
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(d_inner, config.n_embd, bias=False)
        self._init_dt(config)

    @torch.no_grad()
    def _init_dt(self, config: MambaConfig) -> None:
        """Mamba's init: Δ starts log-uniform in [dt_min, dt_max], through softplus's inverse."""
        nn.init.uniform_(self.dt_proj.weight, -(config.dt_rank**-0.5), config.dt_rank**-0.5)
        log_dt = torch.empty(config.d_inner).uniform_(math.log(config.dt_min), math.log(config.dt_max))
        dt = log_dt.exp().clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        T = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = F.silu(self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2))  # causal: keep first T
        rank, n_state = self.config.dt_rank, self.config.d_state
        dt, B, C = self.x_proj(x).split([rank, n_state, n_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        # The scan runs in float32 even under bf16 autocast: the state accumulates over many steps.
        x, delta, B, C, z = (at_least_float32(t) for t in (x, delta, B, C, z))
        A = -torch.exp(self.A_log)
        y = self.scan(x, delta, A, B, C) + x * self.D
        return self.out_proj((y * F.silu(z)).to(u.dtype))

    def scan(self, x, delta, A, B, C) -> torch.Tensor:
        form = self.config.scan
        if form == "auto":
            form = "sequential" if x.device.type == "cpu" else "chunked"
        if form == "sequential":
            return selective_scan_sequential(x, delta, A, B, C)
        return selective_scan_chunked(x, delta, A, B, C, self.config.chunk_size)


class MambaLM(SequenceLM):
    """Stack of pre-LayerNorm residual Mamba blocks (no MLP, as in Mamba)."""

    model_type = "mamba"
    config_class = MambaConfig

    def __init__(self, config: MambaConfig):
        super().__init__(config, residual_stack(lambda: MambaMixer(config), config, mlp_ratio=0))
