"""generate(): the state-based loop draws the same tokens as re-running the full forward pass."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import VOCAB, tiny_gpt, tiny_mosaic
from torch import nn

from memory_mosaics.errors import ConfigError
from memory_mosaics.inference.generate import filter_logits, generate


@torch.no_grad()
def generate_by_recomputation(model, idx, steps, window=None, temperature=0.0, seed=None):
    """The plain twin: the full forward pass on the (optionally cropped) sequence for every token."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for _ in range(steps):
        logits, _ = model(idx if window is None else idx[:, -window:])
        logits = logits[:, -1].float()
        if temperature == 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
        idx = torch.cat([idx, token], dim=1)
    return idx


class Stateless(nn.Module):
    """A model with only a forward pass (like the RNN/SSM baselines or a wrapper)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, idx, targets=None):
        return self.model(idx)


@pytest.mark.parametrize("value_kind", ["lowrank", "kernel2"])
def test_mosaic_generation_matches_recomputation_beyond_block_size(value_kind):
    model = tiny_mosaic(seed=1, value_kind=value_kind, v_shift=2)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompt, 20, temperature=0)  # 25 tokens > block_size 16: the Mosaic is not cropped
    assert torch.equal(out, generate_by_recomputation(model, prompt, 20))
    sampled = generate(model, prompt, 12, temperature=1.0, seed=3)
    assert torch.equal(sampled, generate_by_recomputation(model, prompt, 12, temperature=1.0, seed=3))


def test_gpt_generation_matches_cropped_recomputation():
    model = tiny_gpt(block_size=12)
    prompt = torch.randint(0, VOCAB, (1, 4))
    out = generate(model, prompt, 16, temperature=0)  # cache up to 12 tokens, then the cropped window
    assert torch.equal(out, generate_by_recomputation(model, prompt, 16, window=12))
    long_prompt = torch.randint(0, VOCAB, (1, 15))  # a prompt already past block_size
    out = generate(model, long_prompt, 3, temperature=0)
    assert torch.equal(out, generate_by_recomputation(model, long_prompt, 3, window=12))


def test_stateless_models_use_recomputation():
    model = tiny_mosaic(seed=2)
    prompt = torch.randint(0, VOCAB, (1, 3))
    out = generate(Stateless(model), prompt, 8, temperature=0)
    assert torch.equal(out, generate_by_recomputation(model, prompt, 8))
    with pytest.raises(ConfigError, match="no recurrent state"):
        generate(Stateless(model), prompt, 2, state_options={"memory_size": 4})


def test_bounded_state_options_reach_the_model():
    model = tiny_mosaic(seed=3)
    prompt = torch.randint(0, VOCAB, (1, 6))
    out = generate(model, prompt, 10, temperature=0, state_options={"memory_size": 3, "eviction": "fifo"})
    state = model.init_state(1, memory_size=3, eviction="fifo")
    logits, state = model.step(prompt, state)
    expected = prompt
    for _ in range(10):
        token = logits[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, token], dim=1)
        logits, state = model.step(token, state)
    assert torch.equal(out, expected)


def test_stop_token_stream_and_seed():
    model = tiny_mosaic(seed=4)
    prompt = torch.randint(0, VOCAB, (1, 3))
    greedy = generate(model, prompt, 10, temperature=0)
    stop = int(greedy[0, 5])
    seen = []
    stopped = generate(model, prompt, 10, temperature=0, stop_token=stop, stream=seen.append)
    first = int((greedy[0, 3:] == stop).nonzero()[0]) + 1
    assert torch.equal(stopped, greedy[:, : 3 + first])
    assert [int(t[0]) for t in seen] == greedy[0, 3 : 3 + first].tolist()
    a = generate(model, prompt, 8, top_k=5, top_p=0.9, seed=11)
    b = generate(model, prompt, 8, top_k=5, top_p=0.9, seed=11)
    assert torch.equal(a, b)
    assert generate(model, prompt, 0).shape == (1, 3)
    assert model.training is False


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    probs = torch.softmax(logits, -1)[0]  # 0.64, 0.24, 0.09, 0.03
    kept = torch.isfinite(filter_logits(logits, top_p=float(probs[0] + 0.01)))[0]
    assert kept.tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    "kwargs", [{"max_new_tokens": -1}, {"temperature": -0.5}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_bad_arguments(kwargs):
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ConfigError):
        generate(tiny_mosaic(), torch.zeros(1, 2, dtype=torch.long), **args)
