"""The inspector's retrieval weights are the ones the model used: rebuilt outputs equal its own."""

from __future__ import annotations

import math

import pytest
import torch

from memory_mosaics import GPT, GPTConfig
from memory_mosaics.errors import MosaicError
from memory_mosaics.inspect.retrieval import _forward_with_hooks, context_weights, inspect_sequence
from memory_mosaics.ops import context_retrieval, context_retrieval_reference

CONFIGS = {
    "default": {},
    "two_tables_bias": {"pmem_count": 2, "bias": True},
    "shift2_kernel2": {"v_shift": 2, "value_kind": "kernel2"},
    "post_ln_attn_only": {"pre_ln": False, "attn_only": True},
    "reference_impl": {"impl": "reference", "n_head": 4},
}


def ids_of(length: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", CONFIGS)
def test_rebuilt_outputs_equal_the_models_own(make_mosaic, name):
    model = make_mosaic(**CONFIGS[name]).double()
    inspection = inspect_sequence(model, ids_of(19), top_k=3)
    # In float64 the explicit softmax and the model's fused attention agree to rounding.
    assert inspection.max_error < 1e-12
    for layer in inspection.layers:
        assert layer.context.max_error < 1e-12
        assert (layer.persistent is None) == bool(CONFIGS[name].get("attn_only"))


def test_float32_model_agrees_to_float_tolerance(make_mosaic):
    inspection = inspect_sequence(make_mosaic(), ids_of(40), top_k=5)
    assert inspection.max_error < 1e-5


def test_weights_times_values_is_the_models_retrieval(make_mosaic):
    model = make_mosaic(v_shift=2).double()
    _, captured = _forward_with_hooks(model, torch.tensor([ids_of(17)]))
    keys, values = captured[1]["context"]["keys"], captured[1]["context"]["values"]
    ours = context_weights(keys, shift=2) @ values
    torch.testing.assert_close(ours, context_retrieval_reference(keys[None], values[None], 2)[0], rtol=0, atol=1e-13)
    torch.testing.assert_close(ours, context_retrieval(keys[None], values[None], 2)[0], rtol=0, atol=1e-12)
    # The check can fail: the weights of a wrong shift do not rebuild the model's retrieval.
    wrong = context_weights(keys, shift=1) @ values
    assert (wrong - ours).abs().max() > 1e-3


def test_weight_rows_are_distributions_over_the_admissible_past(make_mosaic):
    shift, length = 2, 23
    inspection = inspect_sequence(make_mosaic(v_shift=shift).double(), ids_of(length), top_k=4)
    steps = torch.arange(length)
    for layer in inspection.layers:
        weights = layer.context.weights
        sums = weights.sum(-1)
        torch.testing.assert_close(sums[:, shift:], torch.ones_like(sums[:, shift:]), rtol=0, atol=1e-12)
        assert torch.all(sums[:, :shift] == 0)
        future = steps[None, :] > steps[:, None] - shift
        assert torch.all(weights[:, future] == 0)


def test_top_entries_sorted_admissible_and_summing_at_most_one(make_mosaic):
    shift, length, top_k = 1, 30, 5
    inspection = inspect_sequence(make_mosaic(pmem_count=2), ids_of(length), top_k=top_k)
    for layer in inspection.layers:
        for top in (layer.context.top, layer.persistent.top):
            assert top.weight.shape[-1] == top_k
            assert torch.all(top.weight[..., :-1] >= top.weight[..., 1:])
            assert torch.all(top.weight.sum(-1) <= 1 + 1e-9)
        index = layer.context.top.index
        for t in range(length):
            kept = index[:, t][index[:, t] >= 0]
            assert torch.all(kept <= t - shift)
            assert kept.numel() == index.shape[0] * min(top_k, max(0, t - shift + 1))
        # Position 0 (t < shift) retrieves no stored entry at all.
        assert torch.all(index[:, 0] == -1) and torch.all(layer.context.top.weight[:, 0] == 0)
        assert torch.all(layer.context.output_norm[:, 0] == 0)
        # Every position's persistent weights form one distribution over all tables' slots.
        usage = layer.persistent.slot_usage.sum(-1)
        torch.testing.assert_close(usage, torch.full_like(usage, length), rtol=1e-9, atol=1e-9)


def test_contribution_is_weight_times_projected_value_norm(make_mosaic):
    model = make_mosaic().double()
    ids = ids_of(12)
    inspection = inspect_sequence(model, ids, top_k=12)  # every entry kept
    _, captured = _forward_with_hooks(model, torch.tensor([ids]))
    layer, memory, head, t = 1, model.blocks[1].context, 2, 9
    d = 24 // 3
    top = inspection.layers[layer].context.top
    w_o = memory.c_proj.weight.detach()[:, head * d : (head + 1) * d]
    values = captured[layer]["context"]["values"][head]
    for s, w, c in zip(top.index[head, t], top.weight[head, t], top.contribution[head, t], strict=True):
        if s < 0:
            continue
        assert math.isclose(c.item(), w.item() * (w_o @ values[s]).norm().item(), rel_tol=1e-12)
    # The head's output is the sum of the entries' vectors: its norm is at most the contributions' sum.
    output_norm = inspection.layers[layer].context.output_norm[head, t]
    assert output_norm <= top.contribution[head, t].sum() + 1e-12


def test_head_parameters_read_from_the_modules(make_mosaic):
    model = make_mosaic()
    inspection = inspect_sequence(model, ids_of(5))
    key = model.blocks[1].persistent.key
    params = inspection.layers[1].persistent.params
    torch.testing.assert_close(params.decay, 10 * key.leak.detach().double().abs())
    torch.testing.assert_close(params.retention, torch.exp(-params.decay))
    torch.testing.assert_close(params.half_life, math.log(2) / params.decay)
    torch.testing.assert_close(params.key_scale, key.scale().detach().double())
    torch.testing.assert_close(params.bandwidth * params.key_scale, torch.ones(3, dtype=torch.float64))
    assert len(set(params.decay.tolist())) == 3  # heads differ, so a mix-up would show


def test_bad_inputs(make_mosaic):
    with pytest.raises(MosaicError, match="empty"):
        inspect_sequence(make_mosaic(), [])
    with pytest.raises(MosaicError, match="top_k"):
        inspect_sequence(make_mosaic(), [1, 2], top_k=0)
    gpt = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0))
    with pytest.raises(MosaicError, match="Memory Mosaic"):
        inspect_sequence(gpt, [1, 2])


def test_leaves_training_mode_as_it_was(make_mosaic):
    model = make_mosaic(dropout=0.1).train()
    first = inspect_sequence(model, ids_of(10))
    second = inspect_sequence(model, ids_of(10))
    assert model.training
    torch.testing.assert_close(first.layers[0].context.weights, second.layers[0].context.weights)  # no dropout
