"""What each memory of a Memory Mosaic retrieved, for every position of one sequence.

The model runs its own forward pass once, in eval mode, with hooks on every memory. The hooks keep the
keys and values the model itself computed (the outputs of its key and value feature extractors) and
the output of each memory module. From those keys we compute the retrieval weights explicitly:

    context memory, head h:     w_ts = softmax_{s <= t - shift} <k_t, k_s>     rows t < shift: none
    persistent memory, table c:  w_tj = softmax_j <q_t, M_k[c, h, j]>          (no mask)

and rebuild each memory's output from them (weights @ values, then c_proj). The largest difference
between the rebuilt and the actual outputs is returned with the result (`max_error`), so every
inspection carries its own proof that the weights shown are the ones the model used.

How much an entry contributed to the output: the entry's value goes through the head's slice of the
output projection, W_o^(h) = c_proj.weight[:, h*d:(h+1)*d], so entry s adds w_ts * W_o^(h) v_s to
the residual stream. Its contribution is the norm of that vector, w_ts * |W_o^(h) v_s|. The head's
output is the sum of these vectors, so its norm is at most the sum of the contributions.
For a persistent slot j of table c the vector is (w_tj / count) * exp(10 gamma_h) * W_o^(h) M_v[c,h,j].
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from memory_mosaics.errors import MosaicError
from memory_mosaics.models.memory_mosaic import MemoryMosaic


@dataclasses.dataclass
class HeadParameters:
    """The learned shape of one memory's keys, per head (all tensors of shape (H,))."""

    decay: Tensor  # beta_h = 10 |theta_h|
    retention: Tensor  # exp(-beta_h): the weight of the previous step's average
    half_life: Tensor  # ln 2 / beta_h steps (inf when beta_h = 0)
    key_scale: Tensor  # s_h^p: the factor applied to the unit-norm key
    bandwidth: Tensor  # 1 / s_h^p: the width of the Gaussian kernel on unit keys
    value_scale: Tensor  # exp(10 gamma_h): the norm of a context value, or the persistent output scale


@dataclasses.dataclass
class TopEntries:
    """The k largest weights per (head, query), sorted; `index` is -1 where fewer than k exist."""

    index: Tensor  # (H, T, k) int64: context position, or table * size + slot for persistent
    weight: Tensor  # (H, T, k)
    contribution: Tensor  # (H, T, k): weight * |W_o^(h) value|


@dataclasses.dataclass
class MemoryInspection:
    params: HeadParameters
    top: TopEntries
    output_norm: Tensor  # (H, T): |W_o^(h) r_t|, the norm of what the head adds to the residual stream
    max_error: float  # max |rebuilt output - the module's own output|


@dataclasses.dataclass
class ContextInspection(MemoryInspection):
    weights: Tensor  # (H, T, T): full retrieval matrix, row t = query, column s = stored entry
    lookback: Tensor  # (H, T): mean distance t - s under the weights (0 where nothing is retrieved)
    effective_entries: Tensor  # (H, T): exp(entropy of the weights) (0 where nothing is retrieved)


@dataclasses.dataclass
class PersistentInspection(MemoryInspection):
    size: int  # slots per table
    count: int  # tables
    slot_usage: Tensor  # (H, count * size): weight summed over the sequence's positions


@dataclasses.dataclass
class LayerInspection:
    context: ContextInspection
    persistent: PersistentInspection | None


@dataclasses.dataclass
class Inspection:
    ids: list[int]
    shift: int
    logits: Tensor  # (T, V), float32
    layers: list[LayerInspection]

    @property
    def max_error(self) -> float:
        errors = [layer.context.max_error for layer in self.layers]
        errors += [layer.persistent.max_error for layer in self.layers if layer.persistent is not None]
        return max(errors)


def inspect_sequence(model: MemoryMosaic, ids: list[int], top_k: int = 5) -> Inspection:
    """Run `model` on `ids` once and explain, per layer and head, what every position retrieved."""
    if not isinstance(model, MemoryMosaic):
        raise MosaicError(f"only Memory Mosaic models can be inspected, got {type(model).__name__}")
    if not ids:
        raise MosaicError("nothing to inspect: the token sequence is empty")
    if top_k < 1:
        raise MosaicError(f"top_k must be >= 1, got {top_k}")
    was_training = model.training
    model.eval()
    try:
        logits, captured = _forward_with_hooks(model, torch.tensor([ids], dtype=torch.long))
    finally:
        model.train(was_training)
    shift = model.config.v_shift
    layers = []
    for block, memories in zip(model.blocks, captured, strict=True):
        context = _inspect_context(block.context, memories["context"], shift, top_k)
        persistent = None
        if block.persistent is not None:
            persistent = _inspect_persistent(block.persistent, memories["persistent"], top_k)
        layers.append(LayerInspection(context, persistent))
    return Inspection(list(ids), shift, logits[0].float(), layers)


def _forward_with_hooks(model: MemoryMosaic, idx: Tensor) -> tuple[Tensor, list[dict[str, dict[str, Tensor]]]]:
    """The model's forward pass, keeping each memory's keys, values and output (batch row 0)."""
    captured: list[dict[str, dict[str, Tensor]]] = [{"context": {}, "persistent": {}} for _ in model.blocks]
    handles = []

    def keep(store: dict[str, Tensor], name: str):
        def hook(module, inputs, output):
            store[name] = output.detach()[0]

        return hook

    for layer, block in enumerate(model.blocks):
        memories = {"context": block.context, "persistent": block.persistent}
        for kind, memory in memories.items():
            if memory is None:
                continue
            store = captured[layer][kind]
            handles.append(memory.key.register_forward_hook(keep(store, "keys")))
            handles.append(memory.register_forward_hook(keep(store, "output")))
            if kind == "context":
                handles.append(memory.value.register_forward_hook(keep(store, "values")))
    try:
        with torch.no_grad():
            logits, _ = model(idx.to(model.wte.weight.device))
    finally:
        for handle in handles:
            handle.remove()
    return logits.detach(), captured


def _head_parameters(key_extractor, value_scale: Tensor) -> HeadParameters:
    with torch.no_grad():
        decay = key_extractor.decay().double().cpu()
        key_scale = key_extractor.scale().double().cpu()
        value = torch.exp(10 * value_scale.detach().double().cpu())
    return HeadParameters(
        decay=decay,
        retention=torch.exp(-decay),
        half_life=torch.where(decay > 0, math.log(2) / decay, torch.full_like(decay, math.inf)),
        key_scale=key_scale,
        bandwidth=1 / key_scale,
        value_scale=value,
    )


def head_output_maps(c_proj_weight: Tensor, n_head: int) -> Tensor:
    """c_proj.weight (C, C) split by input columns into the heads' maps W_o^(h): (H, C, d)."""
    channels = c_proj_weight.shape[0]
    return c_proj_weight.detach().double().cpu().view(channels, n_head, -1).permute(1, 0, 2)


def context_weights(keys: Tensor, shift: int) -> Tensor:
    """Retrieval weights (H, T, T) of a context memory from its keys (H, T, d), in float64."""
    keys = keys.double()
    length = keys.shape[-2]
    steps = torch.arange(length, device=keys.device)
    admissible = steps[None, :] <= steps[:, None] - shift
    scores = (keys @ keys.transpose(-1, -2)).masked_fill(~admissible, -math.inf)
    has_past = (steps >= shift)[:, None]
    # A row with no admissible entry would be a softmax over -inf only; it retrieves nothing.
    return torch.softmax(scores.masked_fill(~has_past, 0.0), dim=-1) * has_past


def _inspect_context(memory, captured: dict[str, Tensor], shift: int, top_k: int) -> ContextInspection:
    keys, values = captured["keys"].cpu(), captured["values"].cpu().double()
    n_head, length, _ = keys.shape
    weights = context_weights(keys, shift)
    read = weights @ values  # (H, T, d)
    maps = head_output_maps(memory.c_proj.weight, n_head)
    head_out = torch.einsum("hcd,htd->htc", maps, read)  # what each head adds, before c_proj's bias
    rebuilt = head_out.sum(0)
    if memory.c_proj.bias is not None:
        rebuilt = rebuilt + memory.c_proj.bias.detach().double().cpu()
    max_error = (rebuilt - captured["output"].cpu().double()).abs().max().item()

    value_norms = torch.einsum("hcd,hsd->hsc", maps, values).norm(dim=-1)  # |W_o^(h) v_s|, (H, T)
    k = min(top_k, length)
    weight, index = weights.topk(k, dim=-1)
    steps = torch.arange(length)
    admissible = index <= (steps[None, :, None] - shift)
    index = torch.where(admissible, index, -1)
    weight = torch.where(admissible, weight, 0.0)
    contribution = weight * torch.gather(value_norms[:, None, :].expand(-1, length, -1), 2, index.clamp(min=0))

    distance = (steps[:, None] - steps[None, :]).clamp(min=0).double()
    entropy = -(weights * torch.log(weights.clamp(min=1e-300))).sum(-1)
    has_past = (steps >= shift)[None, :]
    return ContextInspection(
        params=_head_parameters(memory.key, memory.value.value_scale),
        top=TopEntries(index, weight, contribution),
        output_norm=head_out.norm(dim=-1),
        max_error=max_error,
        weights=weights,
        lookback=(weights * distance).sum(-1),
        effective_entries=torch.where(has_past, torch.exp(entropy), 0.0),
    )


def _inspect_persistent(memory, captured: dict[str, Tensor], top_k: int) -> PersistentInspection:
    queries = captured["keys"].cpu().double()  # (H, T, d): the persistent memory's leaky keys
    memory_keys = memory.memory_keys.detach().cpu().double()  # (count, H, P, d)
    memory_values = memory.memory_values.detach().cpu().double()
    count, n_head, size, _ = memory_keys.shape
    out_scale = torch.exp(10 * memory.out_scale.detach().cpu().double())  # (H,)
    # Each table's softmax divided by the number of tables: one distribution over every slot.
    weights = torch.softmax(torch.einsum("htd,chpd->chtp", queries, memory_keys), dim=-1) / count
    weights = weights.permute(1, 2, 0, 3).reshape(n_head, queries.shape[1], count * size)  # (H, T, count*P)
    slot_values = memory_values.permute(1, 0, 2, 3).reshape(n_head, count * size, -1) * out_scale[:, None, None]
    read = weights @ slot_values  # (H, T, d)
    maps = head_output_maps(memory.c_proj.weight, n_head)
    head_out = torch.einsum("hcd,htd->htc", maps, read)
    rebuilt = head_out.sum(0)
    if memory.c_proj.bias is not None:
        rebuilt = rebuilt + memory.c_proj.bias.detach().double().cpu()
    max_error = (rebuilt - captured["output"].cpu().double()).abs().max().item()

    slot_norms = torch.einsum("hcd,hpd->hpc", maps, slot_values).norm(dim=-1)  # (H, count*P)
    weight, index = weights.topk(min(top_k, count * size), dim=-1)
    contribution = weight * torch.gather(slot_norms, 1, index.flatten(1)).view_as(index)
    return PersistentInspection(
        params=_head_parameters(memory.key, memory.out_scale),
        top=TopEntries(index, weight, contribution),
        output_norm=head_out.norm(dim=-1),
        max_error=max_error,
        size=size,
        count=count,
        slot_usage=weights.sum(1),
    )
