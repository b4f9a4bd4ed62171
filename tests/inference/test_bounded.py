"""Bounded context memories: capacity, eviction policies, and equality with the unbounded model."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import VOCAB, run_chunks, tiny_mosaic

from memory_mosaics.inference.bounded import FIFO, LRU, SinkRecent, SlotMemory, dense_read

DIM = 8


def serve(memory: SlotMemory, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, shift: int = 1):
    """Step a store through a sequence: the pair of position t - shift is written before query t reads."""
    length = queries.shape[2]
    reads = []
    for t in range(length):
        pair = slice(t - shift, t - shift + 1) if t >= shift else slice(0, 0)
        reads.append(memory.extend_and_read(queries[:, :, t : t + 1], keys[:, :, pair], values[:, :, pair], t))
    return torch.cat(reads, dim=2)


def unit(index: int, scale: float = 10.0) -> torch.Tensor:
    vector = torch.zeros(1, 1, 1, DIM)
    vector[..., index % DIM] = scale
    return vector


@pytest.mark.parametrize("eviction", ["lru", "fifo", "sink+recent"])
def test_capacity_is_never_exceeded(eviction):
    model = tiny_mosaic(v_shift=2)
    state = model.init_state(2, memory_size=5, eviction=eviction)
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(0))
    for t in range(30):
        model.step(idx[:, t : t + 1], state)
        for layer in state.layers:
            memory = layer.memory
            assert memory.filled == min(5, max(0, t + 1 - 2))
            assert memory.keys.shape[2] == 5  # never allocated beyond capacity
            stored = memory.position[:, :, : memory.filled]
            # every slot holds a distinct pair that is already complete (s <= t - m)
            if memory.filled:
                assert int(stored.max()) <= t - 2
            for row in stored.flatten(0, 1):
                assert row.unique().numel() == row.numel()


@pytest.mark.parametrize("eviction", ["lru", "fifo", "sink+recent"])
def test_capacity_at_least_the_length_equals_unbounded_exactly(eviction):
    model = tiny_mosaic(seed=2, v_shift=1)
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    for sizes in ([24], [1] * 24, [3, 1, 9, 11]):
        unbounded, _ = run_chunks(model, idx, sizes)
        bounded, _ = run_chunks(model, idx, sizes, memory_size=24, eviction=eviction)
        assert torch.equal(bounded, unbounded)
    full, _ = model(idx)
    torch.testing.assert_close(bounded, full, rtol=0, atol=1e-5)


def test_small_capacity_changes_the_result():
    """The bound is real: with 3 slots the logits differ from the unbounded model once pairs are evicted."""
    model = tiny_mosaic(seed=2)
    idx = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    unbounded, _ = run_chunks(model, idx, [20])
    bounded, _ = run_chunks(model, idx, [20], memory_size=3, eviction="fifo")
    torch.testing.assert_close(bounded[:, :4], unbounded[:, :4], rtol=0, atol=1e-5)  # nothing evicted yet
    assert (bounded[:, 5:] - unbounded[:, 5:]).abs().max() > 1e-3


def test_lru_keeps_an_old_entry_that_keeps_being_retrieved():
    """Pair 0 (key e0) is retrieved by every query; the other pairs are never retrieved and go first."""
    length = 12
    keys = torch.cat([unit(0)] + [unit(1 + t % (DIM - 1)) for t in range(1, length)], dim=2)
    values = torch.randn(1, 1, length, DIM)
    queries = unit(0).expand(1, 1, length, DIM)  # close to pair 0 only: weight ~1 on it, ~e^-100 elsewhere
    lru = SlotMemory(capacity=4, policy=LRU(threshold=0.01), shift=1, hasher=None)
    fifo = SlotMemory(capacity=4, policy=FIFO(), shift=1, hasher=None)
    serve(lru, queries, keys, values)
    serve(fifo, queries, keys, values)
    assert sorted(lru.position[0, 0].tolist()) == [0, length - 4, length - 3, length - 2]
    assert sorted(fifo.position[0, 0].tolist()) == [length - 5, length - 4, length - 3, length - 2]
    assert int(lru.last_used[0, 0][lru.position[0, 0] == 0]) == length - 1  # used by the last query


def test_lru_evicts_the_least_recently_used_entry():
    """Pair s has key e_s and is written at step s + 1. Step 4 uses pair 0, step 5 pairs 0 and 2 (weight
    1/2 each); the 'idle' queries (e7) spread their weight evenly and use nothing once 3 pairs are stored.
    Step 5 must evict pair 1 (last used at step 2), step 6 pair 3 (written at 4, never used since), although
    pair 0 is the oldest."""
    idle = unit(7)
    queries = torch.cat([idle, idle, idle, idle, unit(0), unit(0) + unit(2), idle], dim=2)
    keys = torch.cat([unit(s) for s in range(6)], dim=2)
    values = torch.randn(1, 1, 6, DIM)
    memory = SlotMemory(capacity=4, policy=LRU(threshold=0.4), shift=1, hasher=None)
    serve(memory, queries[:, :, :6], keys, values)
    assert sorted(memory.position[0, 0].tolist()) == [0, 2, 3, 4]
    assert memory.position[0, 0].tolist() == [0, 4, 2, 3]  # pair 4 took the slot of pair 1
    assert memory.last_used[0, 0].tolist() == [5, 5, 5, 4]
    memory.extend_and_read(queries[:, :, 6:7], keys[:, :, 5:6], values[:, :, 5:6], 6)
    assert sorted(memory.position[0, 0].tolist()) == [0, 2, 4, 5]


def test_fifo_and_sink_recent_match_a_masked_softmax():
    """Plain twin: FIFO reads the last M pairs, sink+recent the first s and the last M - s pairs."""
    torch.manual_seed(0)
    length, capacity, sink = 20, 6, 2
    keys = torch.randn(2, 3, length, DIM)
    values = torch.randn(2, 3, length, DIM)
    queries = torch.randn(2, 3, length, DIM)
    t = torch.arange(length)[:, None]
    s = torch.arange(length)[None, :]
    past = s <= t - 1
    windows = {
        "fifo": (FIFO(), past & (s > t - 1 - capacity)),
        "sink+recent": (SinkRecent(sink), past & ((s > t - 1 - (capacity - sink)) | (s < sink))),
    }
    for name, (policy, mask) in windows.items():
        reads = serve(SlotMemory(capacity, policy, shift=1, hasher=None), queries, keys, values)
        expected, _ = dense_read(queries, keys, values, mask)
        torch.testing.assert_close(reads, expected, rtol=0, atol=1e-6, msg=name)


def test_sink_recent_keeps_the_first_pairs():
    model = tiny_mosaic()
    idx = torch.randint(0, VOCAB, (1, 30))
    _, state = run_chunks(model, idx, [30], memory_size=8, eviction="sink+recent", sink_size=3)
    for layer in state.layers:
        for row in layer.memory.position.flatten(0, 1):
            assert sorted(row.tolist()) == [0, 1, 2, 24, 25, 26, 27, 28]


def test_bounded_state_stops_growing_and_unbounded_grows():
    model = tiny_mosaic()
    idx = torch.randint(0, VOCAB, (1, 80))
    sizes = {}
    for options in ({}, {"memory_size": 4}):
        state = model.init_state(1, **options)
        history = []
        for t in range(80):
            model.step(idx[:, t : t + 1], state)
            history.append(state.nbytes())
        sizes[bool(options)] = history
    assert len(set(sizes[True][5:])) == 1  # full from step 5 on: constant storage, constant work per token
    assert sizes[False][-1] > sizes[False][10]
