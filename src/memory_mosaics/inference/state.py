"""Recurrent inference state: a Memory Mosaic stepped one chunk at a time, and GPT's KV cache.

    state = model.init_state(batch_size, **options)
    logits, state = model.step(idx_chunk, state)     # chunks of any length, mixed freely

give the logits of the full forward pass on the concatenated sequence (to float tolerance). The state
is updated in place and returned; steps run without gradients and with dropout off.

Memory Mosaic, per block:
- context memory: the leaky key accumulator (the un-normalised sum, one-step update), the stored pairs
  (a `SlotMemory` or a `RandomFeatureMemory`), and the last m = v_shift positions whose values are
  still pending: v_s needs x_{s+m}, so the pair of position s is written only when x_{s+m} arrives.
  For that the state keeps the keys k_s and the x_s-tap of the value projection of those positions.
- persistent memory: only its leaky key accumulator (its pairs are parameters).
GPT: the keys and values of every past position, per layer (absolute positions: up to block_size).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import Tensor, nn

from memory_mosaics.errors import ConfigError, MosaicError
from memory_mosaics.inference.approximate import HyperplaneHash, RandomFeatureMemory, seeded_generator
from memory_mosaics.inference.bounded import SlotMemory, dense_read, make_policy
from memory_mosaics.inference.options import InferenceOptions
from memory_mosaics.layers.memory import ContextMemory, PersistentMemory, merge_heads, split_heads
from memory_mosaics.models.base import check_token_ids
from memory_mosaics.ops import leaky_average, leaky_average_step


@dataclasses.dataclass
class MosaicLayerState:
    memory: SlotMemory | RandomFeatureMemory
    key_sum: Tensor | None = None  # context memory's leaky accumulator, (B, H, d)
    pending_keys: Tensor | None = None  # keys of the last <= m positions, (B, H, P, d)
    pending_now: Tensor | None = None  # their value tap on x_s, (B, H, P, d)
    persistent_sum: Tensor | None = None  # persistent memory's leaky accumulator, (B, H, d)


@dataclasses.dataclass
class MosaicState:
    model_ref: weakref.ReferenceType
    batch_size: int
    options: InferenceOptions
    layers: list[MosaicLayerState]
    position: int = 0  # number of tokens consumed

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (allocated, including unused capacity)."""
        total = 0
        for layer in self.layers:
            total += layer.memory.nbytes()
            for t in (layer.key_sum, layer.pending_keys, layer.pending_now, layer.persistent_sum):
                total += 0 if t is None else t.numel() * t.element_size()
        return total


@dataclasses.dataclass
class GPTState:
    model_ref: weakref.ReferenceType
    batch_size: int
    keys: list[Tensor | None]  # per layer (B, H, block_size, d), filled up to `position`
    values: list[Tensor | None]
    position: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


# -- creation ----------------------------------------------------------------------------------


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"init_state: batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


def _parse_options(options: dict) -> InferenceOptions:
    known = [field.name for field in dataclasses.fields(InferenceOptions)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"init_state: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return InferenceOptions(**options)


def _context_store(context: ContextMemory, options: InferenceOptions, layer: int, param: Tensor):
    n_head = context.key.n_head
    head_dim = context.key.proj.out_features // n_head
    generator = seeded_generator(options.seed, layer)
    if options.retrieval == "features":
        memory = RandomFeatureMemory(context.key.scale(), head_dim, options.num_features, generator)
        memory.weights = memory.weights.to(param.device)
        memory.offset = memory.offset.to(param.device)
        return memory
    hasher = None
    if options.retrieval == "lsh":
        hasher = HyperplaneHash(n_head, head_dim, options.lsh_tables, options.lsh_bits, generator)
        hasher = hasher.to(param.device, param.dtype)
    policy = None
    if options.memory_size is not None:
        policy = make_policy(options.eviction, options.sink_size, options.lru_threshold)
    return SlotMemory(options.memory_size, policy, context.shift, hasher)


def init_mosaic_state(model: nn.Module, batch_size: int, **options) -> MosaicState:
    batch_size = _check_batch_size(batch_size)
    parsed = _parse_options(options)
    param = next(model.parameters())
    with torch.no_grad():
        layers = [
            MosaicLayerState(memory=_context_store(block.context, parsed, i, param))
            for i, block in enumerate(model.blocks)
        ]
    return MosaicState(weakref.ref(model), batch_size, parsed, layers)


def init_gpt_state(model: nn.Module, batch_size: int, **options) -> GPTState:
    batch_size = _check_batch_size(batch_size)
    if options:
        raise ConfigError(
            f"init_state: the GPT's KV cache takes no options, got {', '.join(sorted(options))} "
            "(memory_size, eviction and retrieval apply to Memory Mosaics)"
        )
    n_layer = len(model.blocks)
    return GPTState(weakref.ref(model), batch_size, [None] * n_layer, [None] * n_layer)


# -- checks --------------------------------------------------------------------------------------


def _check_step(model: nn.Module, idx: Tensor, state: object, state_type: type) -> None:
    if not isinstance(state, state_type):
        raise MosaicError(
            f"step: expected a {state_type.__name__} from {type(model).__name__}.init_state, got {type(state).__name__}"
        )
    if state.model_ref() is not model:
        raise MosaicError("step: this state was made by another model; call init_state on this model")
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        shape = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
        raise MosaicError(f"step: idx_chunk must be an int64 tensor of shape (batch, tokens), got {shape}")
    if idx.shape[0] != state.batch_size:
        raise MosaicError(
            f"step: idx_chunk has batch size {idx.shape[0]} but the state was made for {state.batch_size}"
        )
    if idx.shape[1] == 0:
        raise MosaicError("step: idx_chunk holds no tokens; pass at least one token per step")
    check_token_ids(idx, model.config.vocab_size, every_device=True)


# -- Memory Mosaic -------------------------------------------------------------------------------


def _value_taps(context: ContextMemory, x: Tensor) -> tuple[Tensor, Tensor]:
    """The two halves of u_s, per head (B, H, n, d): the tap on x_s and the tap on x_{s+m}."""
    value, n_head = context.value, context.key.n_head
    if value.kind == "lowrank":
        projected = split_heads(value.proj(x), n_head)
        return projected, projected
    now, ahead = value.proj(x).chunk(2, dim=-1)
    return split_heads(now, n_head), split_heads(ahead, n_head)


def _complete_values(context: ContextMemory, now: Tensor, ahead: Tensor) -> Tensor:
    """v_s from the x_s tap of position s and the x_{s+m} tap, as the layer computes it."""
    value = context.value
    if value.kind == "lowrank":
        return value.finish(value.mixed(now, ahead))
    combined = now + ahead
    if value.bias is not None:
        combined = combined + value.bias.view(value.n_head, 1, -1)
    return value.finish(combined)


def _leaky(key: nn.Module, x: Tensor, total: Tensor | None) -> Tensor:
    """The leaky average of the key projections of a chunk (B, H, n, d), continuing from `total`."""
    projected = split_heads(key.proj(x), key.n_head)
    if projected.shape[2] == 1 and total is not None:  # one token: the one-step recurrence
        return leaky_average_step(total, projected[:, :, 0], key.decay()).unsqueeze(2)
    return leaky_average(projected, key.decay(), initial=total)


def _context_step(context: ContextMemory, x: Tensor, layer: MosaicLayerState, start: int) -> Tensor:
    key = context.key
    averaged = _leaky(key, x, layer.key_sum)
    layer.key_sum = averaged[..., -1, :]
    keys = key.finish(averaged)
    now, ahead = _value_taps(context, x)

    # Positions start-P .. start+n-1 wait for their look-ahead; the first P+n-m of them complete now.
    if layer.pending_keys is not None:
        keys_all = torch.cat([layer.pending_keys, keys], dim=2)
        now_all = torch.cat([layer.pending_now, now], dim=2)
    else:
        keys_all, now_all = keys, now
    n = x.shape[1]
    complete = max(0, keys_all.shape[2] - context.shift)
    values = _complete_values(context, now_all[:, :, :complete], ahead[:, :, n - complete :])
    layer.pending_keys, layer.pending_now = keys_all[:, :, complete:], now_all[:, :, complete:]

    if isinstance(layer.memory, RandomFeatureMemory):
        read = layer.memory.extend_and_read(keys, keys_all[:, :, :complete], values)
    else:
        read = layer.memory.extend_and_read(keys, keys_all[:, :, :complete], values, start)
    return context.resid_dropout(context.c_proj(merge_heads(read)))


def _persistent_step(persistent: PersistentMemory, x: Tensor, layer: MosaicLayerState) -> Tensor:
    key = persistent.key
    averaged = _leaky(key, x, layer.persistent_sum)
    layer.persistent_sum = averaged[..., -1, :]
    return persistent.resid_dropout(persistent.c_proj(persistent.read(key.finish(averaged))))


def _block_step(block: nn.Module, x: Tensor, layer: MosaicLayerState, start: int) -> Tensor:
    """MosaicBlock.forward with the memories stepped."""
    if block.pre_ln:
        x = x + _context_step(block.context, block.ln_1(x), layer, start)
        if block.persistent is not None:
            x = x + _persistent_step(block.persistent, block.ln_2(x), layer)
        return x
    x = block.ln_1(x)
    x = x + _context_step(block.context, x, layer, start)
    if block.persistent is not None:
        x = block.ln_2(x)
        x = x + _persistent_step(block.persistent, x, layer)
    return x


@torch.no_grad()
def mosaic_step(model: nn.Module, idx: Tensor, state: MosaicState) -> tuple[Tensor, MosaicState]:
    _check_step(model, idx, state, MosaicState)
    x = model.wte(idx)
    for block, layer in zip(model.blocks, state.layers, strict=True):
        x = _block_step(block, x, layer, state.position)
    state.position += idx.shape[1]
    return model.lm_head(model.ln_f(x)) * model.logit_scale, state


# -- GPT -----------------------------------------------------------------------------------------


def _attention_step(attn: nn.Module, x: Tensor, state: GPTState, layer: int) -> Tensor:
    q, k, v = attn.split_qkv(x)
    start, n = state.position, x.shape[1]
    if state.keys[layer] is None:
        shape = (*k.shape[:2], state.model_ref().config.block_size, k.shape[-1])
        state.keys[layer], state.values[layer] = k.new_zeros(shape), v.new_zeros(shape)
    state.keys[layer][:, :, start : start + n] = k
    state.values[layer][:, :, start : start + n] = v
    keys, values = state.keys[layer][:, :, : start + n], state.values[layer][:, :, : start + n]
    # Query start+i sees positions <= start+i (the diagonal included, as in the forward pass).
    visible = (
        torch.arange(start + n, device=x.device)[None, :] <= torch.arange(start, start + n, device=x.device)[:, None]
    )
    y, _ = dense_read(q * q.shape[-1] ** -0.5, keys, values, visible)
    return attn.project(y)


@torch.no_grad()
def gpt_step(model: nn.Module, idx: Tensor, state: GPTState) -> tuple[Tensor, GPTState]:
    _check_step(model, idx, state, GPTState)
    end = state.position + idx.shape[1]
    if end > model.config.block_size:
        raise MosaicError(
            f"step: the GPT state holds {state.position} tokens; {idx.shape[1]} more would reach {end}, past "
            f"block_size ({model.config.block_size}), where it has no position embedding"
        )
    x = model.embed(idx, start=state.position)
    for i, block in enumerate(model.blocks):
        x = x + _attention_step(block.attn, block.ln_1(x), state, i)
        x = x + block.mlp(block.ln_2(x))
    state.position = end
    return model.lm_head(model.ln_f(x)), state
