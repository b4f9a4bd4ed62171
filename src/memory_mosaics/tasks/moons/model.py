"""The three-moons network: a single context memory with complex-constrained linear maps.

One layer, no residual, no normalisation, no leaky average (spec §8). For an input series
`x_0..x_{T-1}` (6-vectors) and head `h`:

    k_t = W_phi x_t                       key, also the query (head h owns channels [h*d, (h+1)*d))
    v_s = W_psi x_{s+1}                   value: what followed the key's position
    a_ts = softmax_{s<t}(50 <k_t, k_s>)   strictly past keys; row t=0 has none and outputs 0
    yhat_t = W_z concat_h(sum_s a_ts v_s) prediction of y_t = x_{t+1}

Every linear map is complex: each 2x2 block of its real weight is projected onto the form
`[[a, c], [-c, a]]` (a rotation times a scaling) on every call, so a map is a complex matrix acting
on the three (sin, cos) pairs. A moon's motion is a rotation of its pair, so complex maps can
express it, and the moduli of the blocks show which moon each key/value/output coordinate reads.

Incremental generation needs a *delayed value write*: `v_{t-1} = W_psi x_t` is only known once
`x_t` arrives, so `step` writes it into the cache before attending with the new query.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memory_mosaics.errors import ConfigError


@dataclass
class MoonsModelConfig:
    """Shape of the moons memory. The paper compares 1 head x 6 dims with 3 heads x 2 dims."""

    n_head: int = 3
    head_dim: int = 2
    input_dim: int = 6
    attn_scale: float = 50.0

    def __post_init__(self) -> None:
        if self.n_head < 1:
            raise ConfigError(f"MoonsModelConfig.n_head must be >= 1, got {self.n_head}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"MoonsModelConfig.head_dim must be even and >= 2 (complex pairs), got {self.head_dim}")
        if self.input_dim < 2 or self.input_dim % 2:
            raise ConfigError(f"MoonsModelConfig.input_dim must be a positive even number, got {self.input_dim}")
        if not self.attn_scale > 0:
            raise ConfigError(f"MoonsModelConfig.attn_scale must be > 0, got {self.attn_scale}")

    def to_dict(self) -> dict:
        return asdict(self)


def complex_projection(weight: torch.Tensor) -> torch.Tensor:
    """Project every 2x2 block of a (2m, 2n) matrix onto [[a, c], [-c, a]] (nearest such block)."""
    rows, cols = weight.shape
    w = weight.reshape(rows // 2, 2, cols // 2, 2)
    a = (w[:, 0, :, 0] + w[:, 1, :, 1]) / 2
    c = (w[:, 0, :, 1] - w[:, 1, :, 0]) / 2
    blocks = torch.stack([torch.stack([a, c], dim=-1), torch.stack([-c, a], dim=-1)], dim=1)
    return blocks.reshape(rows, cols)


class ComplexLinear(nn.Module):
    """A bias-free linear map whose weight is projected to complex form at every call."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))

    def complex_weight(self) -> torch.Tensor:
        return complex_projection(self.weight)

    def block_moduli(self) -> torch.Tensor:
        """|a + ic| of each block: shape (out_features/2, in_features/2)."""
        w = self.complex_weight()
        return torch.hypot(w[0::2, 0::2], w[0::2, 1::2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.complex_weight())


class MoonsCache:
    """Keys and values of the positions seen so far, for step-by-step prediction.

    After `length` positions, keys 0..length-1 are stored, values only 0..length-2: the value of
    the last position waits for the next input (the delayed write).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        self.keys, self.values, self.length = keys, values, length

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def from_prefix(cls, keys: torch.Tensor, values: torch.Tensor, length: int, capacity: int) -> MoonsCache:
        """A cache holding the first `length` positions of keys (B,H,T,d) and values (B,H,T-1,d)."""
        if not 1 <= length <= min(keys.shape[2], capacity):
            raise ConfigError(f"prefix length {length} must be in [1, min({keys.shape[2]}, {capacity})]")
        shape = (*keys.shape[:2], capacity, keys.shape[3])
        cache = cls(keys.new_zeros(shape), keys.new_zeros(shape), length)
        cache.keys[:, :, :length] = keys[:, :, :length]
        cache.values[:, :, : length - 1] = values[:, :, : length - 1]
        return cache


class MoonsMemory(nn.Module):
    """A single context memory predicting the next 6-vector of the three-moons series."""

    def __init__(self, config: MoonsModelConfig):
        super().__init__()
        self.config = config
        width = config.n_head * config.head_dim
        self.key = ComplexLinear(config.input_dim, width)  # W_phi
        self.value = ComplexLinear(config.input_dim, width)  # W_psi
        self.out = ComplexLinear(width, config.input_dim)  # W_z

    def _split_heads(self, z: torch.Tensor) -> torch.Tensor:
        """(..., T, H*d) -> (..., H, T, d)."""
        *lead, t, _ = z.shape
        return z.reshape(*lead, t, self.config.n_head, self.config.head_dim).transpose(-3, -2)

    def _merge_heads(self, z: torch.Tensor) -> torch.Tensor:
        """(..., H, T, d) -> (..., T, H*d)."""
        *lead, _, t, _ = z.shape
        return z.transpose(-3, -2).reshape(*lead, t, self.config.n_head * self.config.head_dim)

    def keys_and_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (B,H,T,d) and values (B,H,T-1,d): value s = W_psi x_{s+1}."""
        return self._split_heads(self.key(x)), self._split_heads(self.value(x[:, 1:]))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Explicit attention weights (B, H, T, T); row t holds the weights of keys s < t; row 0 is 0."""
        k, _ = self.keys_and_values(x)
        logits = self.config.attn_scale * k @ k.transpose(-1, -2)
        t = x.shape[1]
        past = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-1)
        weights = torch.softmax(logits.masked_fill(~past, float("-inf")), dim=-1)
        return torch.nan_to_num(weights, nan=0.0)  # row 0: softmax over no key at all

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, explicit: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predictions (B, T, 6) of y_t = x_{t+1} for every t, and the clipped MSE loss if targets given.

        `explicit=True` uses the plain masked-softmax attention (the twin the fast path is tested against).
        """
        if x.dim() != 3 or x.shape[-1] != self.config.input_dim:
            raise ConfigError(f"expected input of shape (B, T, {self.config.input_dim}), got {tuple(x.shape)}")
        k, v = self.keys_and_values(x)
        if explicit:
            mixed = self.attention(x)[..., 1:, :-1] @ v
        else:
            # queries 1..T-1 against keys 0..T-2 with a causal mask = "keys strictly before t".
            mixed = F.scaled_dot_product_attention(
                k[:, :, 1:], k[:, :, :-1], v, is_causal=True, scale=self.config.attn_scale
            )
        mixed = F.pad(mixed, (0, 0, 1, 0))  # position 0 has no past: output 0
        pred = self.out(self._merge_heads(mixed))
        loss = None if targets is None else clipped_mse(pred, targets)
        return pred, loss

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, capacity: int) -> tuple[torch.Tensor, MoonsCache]:
        """Predictions for a prompt x (B, L, 6) and a cache holding it, with room for `capacity` positions."""
        pred, _ = self(x)
        k, v = self.keys_and_values(x)
        return pred, MoonsCache.from_prefix(k, v, x.shape[1], capacity)

    def init_cache(self, batch_size: int, capacity: int, dtype: torch.dtype = torch.float32) -> MoonsCache:
        shape = (batch_size, self.config.n_head, capacity, self.config.head_dim)
        return MoonsCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), 0)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, cache: MoonsCache, write_value: bool = True) -> torch.Tensor:
        """Take the next input x_t (B, 6); return the prediction of x_{t+1} (B, 6).

        `write_value=False` skips the delayed write, which reproduces the authors' cached generation
        (spec §10 item 10: their values stay 0 from the last prompt position on); it exists only to
        measure what that bug changes.
        """
        t = cache.length
        if t >= cache.capacity:
            raise ConfigError(f"cache is full ({cache.capacity} positions); allocate a larger one")
        if t > 0 and write_value:
            # The delayed write: position t-1's value is what followed it, i.e. x_t.
            cache.values[:, :, t - 1] = self._split_heads(self.value(x_t[:, None]))[:, :, 0]
        query = self._split_heads(self.key(x_t[:, None]))  # (B, H, 1, d)
        cache.keys[:, :, t] = query[:, :, 0]
        cache.length = t + 1
        if t == 0:
            mixed = torch.zeros_like(query)
        else:
            logits = self.config.attn_scale * query @ cache.keys[:, :, :t].transpose(-1, -2)
            mixed = torch.softmax(logits, dim=-1) @ cache.values[:, :, :t]
        return self.out(self._merge_heads(mixed))[:, 0]


def clipped_mse(pred: torch.Tensor, target: torch.Tensor, clip: float = 0.5) -> torch.Tensor:
    """Mean of the squared error clipped to [-clip, clip] (spec §8): large misses stop pulling."""
    return (pred - target).clamp(-clip, clip).square().mean()


@torch.no_grad()
def generate(model: MoonsMemory, prompt: torch.Tensor, num_predictions: int) -> torch.Tensor:
    """Continue a prompt x_0..x_{L-1} (B, L, 6) by feeding back predictions.

    Returns (B, num_predictions, 6): the predictions of y_{L-1}, ..., y_{L-2+num_predictions},
    i.e. of x_L, x_{L+1}, ... — the first one uses only true inputs, the later ones earlier predictions.
    """
    length = prompt.shape[1]
    pred, cache = model.prefill(prompt, capacity=length + num_predictions - 1)
    outputs = [pred[:, -1]]
    for _ in range(num_predictions - 1):
        outputs.append(model.step(outputs[-1], cache))
    return torch.stack(outputs, dim=1)
