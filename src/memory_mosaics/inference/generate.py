"""Autoregressive sampling: temperature, top-k, nucleus (top-p), a stop token, a seed, streaming.

For now every new token re-runs the full forward pass on the last `block_size` tokens; the
recurrent-state path (`model.step`) will replace that without changing this signature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


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
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 picks the most likely token), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


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
) -> Tensor:
    """Extend `idx` (B, T) int64 by up to `max_new_tokens` sampled tokens; returns (B, T + new).

    temperature 0 picks the most likely token. `seed` makes the draws reproducible without touching
    the global random generator. `stream`, if given, is called with each new column (B,) as soon as
    it is drawn. Generation stops early once every row has produced `stop_token` (rows that stopped
    earlier keep producing tokens, which the caller may drop).
    """
    _check_args(temperature, top_k, top_p, max_new_tokens)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be (batch, time) with at least one token, got shape {tuple(idx.shape)}")
    block_size = model.config.block_size
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = filter_logits(logits / temperature, top_k, top_p)
                probs = torch.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_token], dim=1)
            if stream is not None:
                stream(next_token[:, 0])
            if stop_token is not None:
                finished |= next_token[:, 0] == stop_token
                if bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    return idx
