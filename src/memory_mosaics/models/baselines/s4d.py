"""S4D: a diagonal state-space layer (Gu, Gupta, Goel & Ré, 2022), in plain PyTorch.

Each of the d channels runs its own linear time-invariant system with N/2 complex modes,

    h_t = exp(Δ A) ⊙ h_{t-1} + B̄ u_t,   B̄ = (exp(Δ A) - 1) / A   (zero-order hold, B = 1),
    y_t = 2 Re(C · h_t) + D u_t,

so the output is a causal convolution of u with the kernel K_l = 2 Re(Σ_n C_n B̄_n exp(Δ A_n)^l).
A is initialised S4D-Lin (A_n = -1/2 + iπn), Δ log-uniform in [dt_min, dt_max].

Three forms compute the same layer: `causal_conv_fft` (the fast one, O(T log T)),
`causal_conv_direct` (the convolution written as a Toeplitz matrix) and `s4d_recurrent` (the
recurrence above); tests check that they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import BaselineConfig, SequenceLM, at_least_float32, require, residual_stack

S4D_FORMS = ("fft", "direct", "recurrent")


@dataclass
class S4DConfig(BaselineConfig):
    d_state: int = 64  # N: N/2 complex modes per channel
    dt_min: float = 1e-3
    dt_max: float = 0.1
    mlp_ratio: int = 4
    form: str = "fft"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            isinstance(self.d_state, int) and self.d_state >= 2 and self.d_state % 2 == 0,
            self, "d_state", "an even integer >= 2", self.d_state,
        )  # fmt: skip
        require(0 < self.dt_min <= self.dt_max, self, "dt_min", "in (0, dt_max]", self.dt_min)
        require(self.mlp_ratio >= 0, self, "mlp_ratio", "an integer >= 0", self.mlp_ratio)
        require(self.form in S4D_FORMS, self, "form", f"one of {S4D_FORMS}", self.form)


def s4d_kernel(dtA: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """K (channel, length): K_l = 2 Re(Σ_n C_n B̄_n exp(dtA_n)^l), all inputs (channel, mode)."""
    powers = torch.exp(dtA.unsqueeze(-1) * torch.arange(length, device=dtA.device))
    return 2 * torch.einsum("hn,hnl->hl", C * B_bar, powers).real


def causal_conv_fft(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_{s<=t} kernel_{t-s} u_s for u (batch, channel, time), by FFT of length 2T
    (zero padding makes the circular convolution linear, hence causal)."""
    T = u.shape[-1]
    n = 2 * T
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(kernel, n=n), n=n)
    return y[..., :T]


def causal_conv_direct(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The same convolution as a lower-triangular Toeplitz matrix: O(T^2), the plain twin."""
    T = u.shape[-1]
    lag = torch.arange(T, device=u.device).unsqueeze(1) - torch.arange(T, device=u.device)  # t - s
    toeplitz = kernel[:, lag.clamp(min=0)] * (lag >= 0)  # (channel, t, s)
    return torch.einsum("hts,bhs->bht", toeplitz, u)


def s4d_recurrent(u: torch.Tensor, dtA: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Run the complex diagonal recurrence one step at a time; u (batch, channel, time)."""
    decay = torch.exp(dtA)
    h = torch.zeros(u.shape[0], *dtA.shape, dtype=dtA.dtype, device=u.device)
    outputs = []
    for u_t in u.unbind(-1):
        h = decay * h + B_bar * u_t.unsqueeze(-1)
        outputs.append(2 * (h * C).sum(-1).real)
    return torch.stack(outputs, dim=-1)


class S4DLayer(nn.Module):
    """S4D convolution per channel, GELU, then a position-wise linear layer with a GLU."""

    def __init__(self, config: S4DConfig):
        super().__init__()
        self.config = config
        channels, modes = config.n_embd, config.d_state // 2
        log_dt = torch.empty(channels).uniform_(math.log(config.dt_min), math.log(config.dt_max))
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.full((channels, modes), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(channels, 1))
        self.C = nn.Parameter(torch.randn(channels, modes, 2) * math.sqrt(0.5))  # complex, as pairs
        self.D = nn.Parameter(torch.randn(channels))
        for p in (self.log_dt, self.log_A_real, self.A_imag, self.C, self.D):
            p._no_weight_decay = True  # the S4 recipe: no weight decay on the state-space parameters
        self.out_proj = nn.Linear(channels, 2 * channels)
        self.drop = nn.Dropout(config.dropout)

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δ A, B̄ and C as complex (channel, mode) tensors."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        dtA = A * torch.exp(self.log_dt).unsqueeze(-1)
        B_bar = (torch.exp(dtA) - 1) / A
        return dtA, B_bar, torch.view_as_complex(self.C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = at_least_float32(x).transpose(1, 2)  # (batch, channel, time); FFTs in >= float32
        dtA, B_bar, C = self.discretize()
        if self.config.form == "recurrent":
            y = s4d_recurrent(u, dtA, B_bar, C)
        else:
            kernel = s4d_kernel(dtA, B_bar, C, u.shape[-1])
            conv = causal_conv_fft if self.config.form == "fft" else causal_conv_direct
            y = conv(u, kernel)
        y = y + u * self.D.unsqueeze(-1)
        y = self.drop(F.gelu(y.transpose(1, 2))).to(x.dtype)
        return F.glu(self.out_proj(y), dim=-1)


class S4DLM(SequenceLM):
    """Stack of pre-LayerNorm residual blocks: S4D layer, then an MLP."""

    model_type = "s4d"
    config_class = S4DConfig

    def __init__(self, config: S4DConfig):
        super().__init__(config, residual_stack(lambda: S4DLayer(config), config, config.mlp_ratio))
