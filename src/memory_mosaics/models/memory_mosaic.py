"""Memory Mosaic: a stack of context and persistent associative memories (Zhang et al., ICLR 2025).

    x = Embedding(idx)                       no positional encoding of any kind: order enters only
    for each block:                          through the leaky key averages, the causal retrieval
        x = x + ContextMemory(LN(x))         and the one-step look-ahead of the values
        x = x + PersistentMemory(LN(x))      (replaces the transformer's feed-forward layer)
    logits = LN(x) @ Embedding^T / sqrt(C)   tied unembedding with the authors' logit scale

With `pmem_size = 3.5 * n_embd` a block has 12 C^2 weights, like a GPT-2 block (4 C^2 attention and
8 C^2 MLP), so the two can be compared at equal size. Defaults follow the authors' Library code.
"""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor, nn

from memory_mosaics.layers.memory import IMPLEMENTATIONS, VALUE_KINDS, ContextMemory, PersistentMemory
from memory_mosaics.models.base import ModelConfig, PretrainedModel, check_token_ids, language_model_loss


@dataclasses.dataclass
class MemoryMosaicConfig(ModelConfig):
    vocab_size: int = 50304
    block_size: int = 512  # training context; the model has no position table and runs at any length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    pmem_size: int = 2688  # persistent-memory slots per head and table (3.5 * n_embd for parity)
    pmem_count: int = 1  # independent persistent tables, averaged
    dropout: float = 0.05  # on retrieval weights and after each memory's output projection
    bias: bool = False
    v_shift: int = 1  # the value looks this many steps ahead; queries read pairs s <= t - v_shift
    value_kind: str = "lowrank"  # "lowrank" (authors' default) or "kernel2" (full 2-tap convolution)
    pre_ln: bool = True  # False: the authors' post-LN option
    attn_only: bool = False  # True: context memories only, no persistent memory
    leaky_chunk_size: int = 32  # chunk of the fast leaky average (a speed knob; results do not change)
    impl: str = "fast"  # "fast" (chunked scan + fused attention) or "reference" (dense, explicit)

    def __post_init__(self) -> None:
        self._check_types()
        self._check_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        self._check_positive("pmem_size", "pmem_count", "v_shift", "leaky_chunk_size")
        self._check_heads()
        self._check_dropout()
        self._check_choice("value_kind", VALUE_KINDS)
        self._check_choice("impl", IMPLEMENTATIONS)


class MosaicBlock(nn.Module):
    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        c = config
        self.pre_ln = c.pre_ln
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=1e-5, bias=c.bias)
        self.context = ContextMemory(
            c.n_embd,
            c.n_head,
            c.n_layer,
            c.dropout,
            c.bias,
            c.v_shift,
            c.value_kind,
            c.impl,
            c.leaky_chunk_size,
        )
        if c.attn_only:
            self.ln_2 = self.persistent = None
        else:
            self.ln_2 = nn.LayerNorm(c.n_embd, eps=1e-5, bias=c.bias)
            self.persistent = PersistentMemory(
                c.n_embd,
                c.n_head,
                c.pmem_size,
                c.pmem_count,
                c.n_layer,
                c.dropout,
                c.bias,
                c.impl,
                c.leaky_chunk_size,
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_ln:
            x = x + self.context(self.ln_1(x))
            if self.persistent is not None:
                x = x + self.persistent(self.ln_2(x))
            return x
        x = self.ln_1(x)
        x = x + self.context(x)
        if self.persistent is not None:
            x = self.ln_2(x)
            x = x + self.persistent(x)
        return x


class MemoryMosaic(PretrainedModel):
    model_type = "memory_mosaic"
    config_class = MemoryMosaicConfig
    tied_parameters = ("lm_head.weight",)

    def __init__(self, config: MemoryMosaicConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(MosaicBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        # The authors initialise the head last, so the tied matrix ends N(0, 1/sqrt(C)).
        nn.init.normal_(self.wte.weight, std=config.n_embd**-0.5)
        self.logit_scale = 1 / math.sqrt(config.n_embd)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.wte.weight]

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        check_token_ids(idx, self.config.vocab_size)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        # Scaling the (B, T, C) input of the head rather than its (B, T, V) output: same logits, 16x
        # fewer multiplications at V = 4096, C = 256.
        logits = self.lm_head(self.ln_f(x) * self.logit_scale)
        return logits, language_model_loss(logits, targets)

    def init_state(self, batch_size: int, **options):
        """A recurrent inference state for `step`; options (memory_size, eviction, retrieval, ...) are
        described in memory_mosaics.inference.options."""
        from memory_mosaics.inference.state import init_mosaic_state  # deferred: inference builds on models

        return init_mosaic_state(self, batch_size, **options)

    def step(self, idx_chunk: Tensor, state):
        """Consume a chunk of tokens (B, n); returns (logits (B, n, V), state), the state updated in place."""
        from memory_mosaics.inference.state import mosaic_step

        return mosaic_step(self, idx_chunk, state)
