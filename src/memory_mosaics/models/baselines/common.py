"""Pieces every sequence-model baseline shares: the config base, the residual block, the LM shell.

Each baseline is `token embedding -> body -> (final LayerNorm) -> head`, with the head tied to the
embedding by default, and answers the project's model contract:
`logits, loss = model(idx, targets=None)` with logits for every position and the loss averaged over
targets that are not -1. Only the body differs between families. They are `PretrainedModel`s, so
`save_pretrained(dir)` and `memory_mosaics.load(dir)` work for them as for GPT and Memory Mosaic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memory_mosaics.errors import ConfigError
from memory_mosaics.models.base import ModelConfig, PretrainedModel, language_model_loss


def require(ok: bool, config: object, field: str, expected: str, value: Any) -> None:
    """Raise a ConfigError naming the config class, the field, what was expected and what came."""
    if not ok:
        raise ConfigError(
            f"{type(config).__name__}.{field} must be {expected}, got {value!r}; pass a value in that range"
        )


@dataclass
class BaselineConfig(ModelConfig):
    """Fields every baseline has. `block_size` is recorded for the harness: these models have no
    positional table and accept sequences of any length."""

    vocab_size: int
    block_size: int
    n_layer: int = 2
    n_embd: int = 128
    dropout: float = 0.0
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_embd"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, self, name, "an integer >= 1", value)
        require(0.0 <= self.dropout < 1.0, self, "dropout", "in [0, 1)", self.dropout)
        require(isinstance(self.tie_weights, bool), self, "tie_weights", "true or false", self.tie_weights)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 (autocast) to float32 for scans and FFTs; leave float32/float64 alone."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MLP(nn.Module):
    """The transformer's feed-forward layer: d -> ratio*d -> GELU -> d."""

    def __init__(self, n_embd: int, ratio: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, ratio * n_embd)
        self.proj = nn.Linear(ratio * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class ResidualBlock(nn.Module):
    """Pre-LayerNorm residual block: x + mixer(LN(x)), then x + MLP(LN(x)) when mlp_ratio > 0."""

    def __init__(self, mixer: nn.Module, n_embd: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln_mix = nn.LayerNorm(n_embd)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)
        self.ln_mlp = nn.LayerNorm(n_embd) if mlp_ratio > 0 else None
        self.mlp = MLP(n_embd, mlp_ratio, dropout) if mlp_ratio > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.mixer(self.ln_mix(x)))
        if self.mlp is not None:
            x = x + self.mlp(self.ln_mlp(x))
        return x


def residual_stack(make_mixer: Callable[[], nn.Module], config: BaselineConfig, mlp_ratio: int) -> nn.Sequential:
    """config.n_layer residual blocks, each around a fresh mixer from `make_mixer`."""
    blocks = [ResidualBlock(make_mixer(), config.n_embd, mlp_ratio, config.dropout) for _ in range(config.n_layer)]
    return nn.Sequential(*blocks)


class SequenceLM(PretrainedModel):
    """Embedding -> body -> final norm -> head. Subclasses set `model_type` and `config_class`
    and build the body from their config."""

    def __init__(self, config: BaselineConfig, body: nn.Module, final_norm: bool = True):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.body = body
        self.ln_f = nn.LayerNorm(config.n_embd) if final_norm else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        nn.init.normal_(self.wte.weight, std=0.02)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    @property
    def tied_parameters(self) -> tuple[str, ...]:  # type: ignore[override]
        """The head is saved once, as the embedding, only when the two are tied."""
        return ("lm_head.weight",) if self.config.tie_weights else ()

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.wte.weight]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        x = self.drop(self.wte(idx))
        x = self.body(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, language_model_loss(logits, targets)
