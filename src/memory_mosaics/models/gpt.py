"""GPT-2 style transformer baseline, as in the authors' `baselines.py` (nanoGPT with tanh-GELU).

Learned absolute positions, causal self-attention that includes the diagonal, a 4C tanh-GELU MLP,
pre-LN blocks, N(0, 0.02) init with output projections scaled by 1/sqrt(2L), tied unembedding and no
logit scale. It is trained by the same trainer as the Memory Mosaic.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memory_mosaics.errors import MosaicError
from memory_mosaics.models.base import ModelConfig, PretrainedModel, check_token_ids, language_model_loss
from memory_mosaics.ops import gelu_tanh


@dataclasses.dataclass
class GPTConfig(ModelConfig):
    vocab_size: int = 50304
    block_size: int = 512
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.05
    bias: bool = False
    position_table: ClassVar[bool] = True  # a block_size x n_embd table of learned positions

    def __post_init__(self) -> None:
        self._check_types()
        self._check_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        self._check_heads()
        self._check_dropout()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, C) -> three (B, H, T, d) tensors."""
        batch, length, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        return tuple(t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))

    def project(self, y: Tensor) -> Tensor:
        """(B, H, T, d) attention output -> (B, T, C) residual update."""
        batch, _, length, _ = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, length, -1)))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split_qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.project(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))  # compiled on CPUs: ops/gelu_cpu.py


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(PretrainedModel):
    model_type = "gpt"
    config_class = GPTConfig
    tied_parameters = ("lm_head.weight",)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.wte.weight, self.wpe.weight]

    def embed(self, idx: Tensor, start: int = 0) -> Tensor:
        """Token plus position embeddings for positions start..start+T-1."""
        end = start + idx.shape[1]
        if end > self.config.block_size:
            raise MosaicError(
                f"sequence of {end} tokens is longer than the GPT's block_size ({self.config.block_size}); "
                "it has no position embedding beyond that"
            )
        positions = torch.arange(start, end, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(positions))

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        check_token_ids(idx, self.config.vocab_size)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, language_model_loss(logits, targets)

    def init_state(self, batch_size: int, **options):
        """A KV cache for `step` (no options; see memory_mosaics.inference.state)."""
        from memory_mosaics.inference.state import init_gpt_state  # deferred: inference builds on models

        return init_gpt_state(self, batch_size, **options)

    def step(self, idx_chunk: Tensor, state):
        """Consume a chunk of tokens (B, n); returns (logits (B, n, V), state), the state updated in place."""
        from memory_mosaics.inference.state import gpt_step

        return gpt_step(self, idx_chunk, state)
