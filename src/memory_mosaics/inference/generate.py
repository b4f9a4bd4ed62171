"""Autoregressive sampling: temperature, top-k, nucleus (top-p), a stop token, a seed, streaming.

A model with a recurrent state (`init_state`/`step`: MemoryMosaic, GPT) reads the prompt once and
then consumes one token per step, so a new token costs what one step costs: for a Memory Mosaic with
bounded memories (`state_options={"memory_size": M}`) that cost does not grow with the number of past
tokens. The logits are those of the full forward pass on everything generated so far.

- Memory Mosaic: no window; the state holds the whole past (or its bounded memories).
- GPT: it has no position embedding past block_size, so, as in the authors' generate, it sees only
  the last block_size tokens. The KV cache serves until the sequence reaches block_size; after that
  each token re-runs the forward pass on the last block_size tokens (positions move every step).
- A model without a state (e.g. the RNN/SSM baselines) re-runs the forward pass on the last
  block_size tokens for every new token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from memory_mosaics.errors import ConfigError
from memory_mosaics.inference.state import GPTState


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with probability >= top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_args(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 picks the most likely token), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


class _NextLogits:
    """Logits for the last position, fed one new token at a time: by the state, or by recomputation."""

    def __init__(self, model: nn.Module, batch_size: int, state_options: dict | None):
        self.model = model
        self.block_size = model.config.block_size
        stateful = hasattr(model, "init_state") and hasattr(model, "step")
        if not stateful and state_options:
            raise ConfigError(f"state_options given, but {type(model).__name__} has no recurrent state")
        self.state = model.init_state(batch_size, **(state_options or {})) if stateful else None

    def _windowed(self, length: int) -> bool:
        """True when the state cannot serve a sequence of this length (GPT past its block_size)."""
        return self.state is None or (isinstance(self.state, GPTState) and length > self.block_size)

    def _recompute(self, idx: Tensor) -> Tensor:
        logits, _ = self.model(idx[:, -self.block_size :])
        return logits[:, -1]

    def first(self, idx: Tensor) -> Tensor:
        if self._windowed(idx.size(1)):
            return self._recompute(idx)
        logits, self.state = self.model.step(idx, self.state)
        return logits[:, -1]

    def next(self, idx: Tensor) -> Tensor:
        """`idx` is the whole sequence; its last column is the token not yet consumed."""
        if self._windowed(idx.size(1)):
            return self._recompute(idx)
        logits, self.state = self.model.step(idx[:, -1:], self.state)
        return logits[:, -1]


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    seed: int | None = None,
    stream: Callable[[Tensor], None] | None = None,
    state_options: dict | None = None,
) -> Tensor:
    """Extend `idx` (B, T) int64 by up to `max_new_tokens` sampled tokens; returns (B, T + new).

    temperature 0 picks the most likely token. `seed` makes the draws reproducible without touching
    the global random generator. `stream`, if given, is called with each new column (B,) as soon as
    it is drawn. Generation stops early once every row has produced `stop_token` (rows that stopped
    earlier keep producing tokens, which the caller may drop). `state_options` go to
    `model.init_state` (e.g. memory_size, eviction, retrieval for a Memory Mosaic).
    """
    _check_args(temperature, top_k, top_p, max_new_tokens)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ConfigError(f"idx must be (batch, time) with at least one token, got shape {tuple(idx.shape)}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    try:
        source = _NextLogits(model, idx.size(0), state_options)
        logits = source.first(idx) if max_new_tokens else None
        for i in range(max_new_tokens):
            logits = logits.float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_token], dim=1)
            if stream is not None:
                stream(next_token[:, 0])
            if stop_token is not None:
                finished |= next_token[:, 0] == stop_token
                if bool(finished.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = source.next(idx)
    finally:
        model.train(was_training)
    return idx
