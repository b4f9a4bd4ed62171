"""Stepping a model chunk by chunk gives the logits of the full forward pass (fp32, within 1e-5)."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import VOCAB, random_split, run_chunks, tiny_gpt, tiny_mosaic

from memory_mosaics.errors import ConfigError, MosaicError

TOL = 1e-5
LENGTH = 21  # longer than block_size (16) and than leaky_chunk_size (8): the Mosaic has no length limit

SPLITS = [[LENGTH], [1] * LENGTH, [5, 1, 1, 9, 2, 1, 2], [2, 9, 10]]


@pytest.mark.parametrize("value_kind", ["lowrank", "kernel2"])
@pytest.mark.parametrize("v_shift", [1, 2])
def test_mosaic_chunks_match_full_forward(value_kind, v_shift):
    model = tiny_mosaic(seed=v_shift, value_kind=value_kind, v_shift=v_shift, bias=True)
    generator = torch.Generator().manual_seed(7)
    idx = torch.randint(0, VOCAB, (2, LENGTH), generator=generator)
    full, _ = model(idx)
    for sizes in [*SPLITS, random_split(LENGTH, generator)]:
        stepped, state = run_chunks(model, idx, sizes)
        assert state.position == LENGTH
        torch.testing.assert_close(stepped, full, rtol=0, atol=TOL, msg=f"split {sizes}")


@pytest.mark.parametrize("overrides", [{"pre_ln": False}, {"attn_only": True}, {"v_shift": 3, "pmem_count": 2}])
def test_mosaic_block_variants_match_full_forward(overrides):
    model = tiny_mosaic(seed=3, **overrides)
    idx = torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)
    for sizes in SPLITS:
        stepped, _ = run_chunks(model, idx, sizes)
        torch.testing.assert_close(stepped, full, rtol=0, atol=TOL)


def test_mosaic_first_positions_read_nothing():
    """Positions t < v_shift have no stored pair: their context memories output exactly zero."""
    model = tiny_mosaic(v_shift=2, attn_only=True)
    state = model.init_state(1)
    idx = torch.randint(0, VOCAB, (1, 2))
    model.step(idx, state)
    for layer in state.layers:
        assert layer.memory.filled == 0  # no pair is complete before x_{s+2} arrives
        assert layer.pending_keys.shape[2] == 2
    model.step(idx[:, :1], state)
    assert all(layer.memory.filled == 1 for layer in state.layers)


@pytest.mark.parametrize(
    "options",
    [
        {"memory_size": 6, "eviction": "lru"},
        {"memory_size": 6, "eviction": "fifo"},
        {"memory_size": 6, "eviction": "sink+recent", "sink_size": 2},
        {"memory_size": 6, "retrieval": "lsh"},
        {"retrieval": "features"},
    ],
)
def test_mosaic_chunking_does_not_change_approximate_or_bounded_results(options):
    """Bounded and approximate memories are defined step by step, so any split gives the same logits
    (a long chunk takes another code path than single steps: overwrite vs window, gathered vs masked)."""
    model = tiny_mosaic(seed=4)
    idx = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    reference, _ = run_chunks(model, idx, [1] * LENGTH, **options)
    for sizes in SPLITS[:1] + SPLITS[2:]:
        stepped, _ = run_chunks(model, idx, sizes, **options)
        torch.testing.assert_close(stepped, reference, rtol=0, atol=TOL)


def test_gpt_cache_matches_full_forward():
    model = tiny_gpt(block_size=40)
    generator = torch.Generator().manual_seed(3)
    idx = torch.randint(0, VOCAB, (2, 40), generator=generator)
    full, _ = model(idx)
    for sizes in [[40], [1] * 40, [3, 1, 17, 1, 18], random_split(40, generator)]:
        stepped, state = run_chunks(model, idx, sizes)
        assert state.position == 40
        torch.testing.assert_close(stepped, full, rtol=0, atol=TOL)


def test_state_memory_grows_by_one_pair_per_token():
    model = tiny_mosaic(v_shift=1)
    _, state = run_chunks(model, torch.randint(0, VOCAB, (1, 20)), [7, 1, 12])
    assert all(layer.memory.filled == 19 for layer in state.layers)
    assert state.nbytes() > 0


def test_bad_inputs_raise_clear_errors():
    model, other = tiny_mosaic(), tiny_mosaic(seed=1)
    state = model.init_state(2)
    with pytest.raises(MosaicError, match="another model"):
        other.step(torch.zeros(2, 1, dtype=torch.long), state)
    with pytest.raises(MosaicError, match="batch size 3"):
        model.step(torch.zeros(3, 1, dtype=torch.long), state)
    with pytest.raises(MosaicError, match="no tokens"):
        model.step(torch.zeros(2, 0, dtype=torch.long), state)
    with pytest.raises(MosaicError, match="token ids"):
        model.step(torch.full((2, 1), VOCAB), state)
    with pytest.raises(MosaicError, match="int64"):
        model.step(torch.zeros(2, 1), state)
    with pytest.raises(MosaicError, match="MosaicState"):
        model.step(torch.zeros(2, 1, dtype=torch.long), tiny_gpt().init_state(2))
    assert state.position == 0  # refused steps leave the state untouched
    gpt = tiny_gpt(block_size=8)
    gpt_state = gpt.init_state(1)
    gpt.step(torch.zeros(1, 6, dtype=torch.long), gpt_state)
    with pytest.raises(MosaicError, match="block_size"):
        gpt.step(torch.zeros(1, 3, dtype=torch.long), gpt_state)
    assert gpt_state.position == 6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory_size": 0}, "memory_size must be >= 1"),
        ({"memory_size": -3}, "memory_size must be >= 1"),
        ({"memory_size": 8, "eviction": "random"}, "eviction must be one of"),
        ({"eviction": "lru"}, "needs memory_size"),
        ({"memory_size": 4, "eviction": "sink+recent", "sink_size": 4}, "sink_size"),
        ({"memory_size": 4, "eviction": "fifo", "lru_threshold": 0.1}, "lru_threshold applies"),
        ({"retrieval": "hnsw"}, "retrieval must be one of"),
        ({"lsh_bits": 4}, "applies to retrieval='lsh'"),
        ({"retrieval": "features", "memory_size": 8}, "fixed-size summary"),
        ({"retrieval": "lsh", "lsh_bits": 40}, "lsh_bits"),
        ({"capacity": 8}, "unknown option"),
    ],
)
def test_bad_options_raise_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        tiny_mosaic().init_state(1, **options)


def test_bad_batch_size_and_gpt_options():
    with pytest.raises(ConfigError, match="batch_size"):
        tiny_mosaic().init_state(0)
    with pytest.raises(ConfigError, match="no options"):
        tiny_gpt().init_state(1, memory_size=8)
