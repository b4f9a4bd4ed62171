"""generate(): greedy is the argmax of the full forward pass; seeds, top-k/top-p, stop token, stream.

With a recurrent state, a Memory Mosaic sees the whole past (it has no position table and no length
limit); a GPT sees the last block_size tokens, as the full recomputation with cropping does.
"""

from __future__ import annotations

import json

import pytest
import torch
from inference_helpers import VOCAB, tiny_gpt, tiny_mosaic
from torch import nn

from memory_mosaics import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.cli import main
from memory_mosaics.data import make_tokenizer
from memory_mosaics.errors import ConfigError
from memory_mosaics.inference.generate import (
    filter_logits,
    generate,
)

SHAPE = {"vocab_size": 50, "block_size": 12, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}


@pytest.fixture(params=["mosaic", "gpt"])
def model(request):
    torch.manual_seed(0)
    if request.param == "mosaic":
        return MemoryMosaic(MemoryMosaicConfig(**SHAPE, pmem_size=16)).eval()
    return GPT(GPTConfig(**SHAPE)).eval()


def greedy_by_hand(model, idx, steps):
    window = model.config.block_size if isinstance(model, GPT) else None
    for _ in range(steps):
        logits, _ = model(idx if window is None else idx[:, -window:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_greedy_matches_full_forward_argmax_past_block_size(model):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompt, max_new_tokens=15, temperature=0)  # 18 tokens > block_size 12
    assert out.shape == (2, 18) and torch.equal(out[:, :3], prompt)
    with torch.no_grad():
        assert torch.equal(out, greedy_by_hand(model, prompt, 15))


def test_seed_makes_draws_reproducible_without_touching_global_rng(model):
    prompt = torch.tensor([[7, 8]])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, prompt, 10, temperature=1.5, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, prompt, 10, temperature=1.5, seed=1)
    c = generate(model, prompt, 10, temperature=1.5, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    greedy = generate(model, prompt, 8, temperature=0)
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, top_k=1, seed=0), greedy)
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, top_p=1e-6, seed=0), greedy)


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.76)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_stop_token_and_stream(model):
    prompt = torch.tensor([[1, 2]])
    greedy = generate(model, prompt, 6, temperature=0)
    stop = int(greedy[0, 4])  # the third generated token
    seen = []
    out = generate(model, prompt, 6, temperature=0, stop_token=stop, stream=lambda c: seen.append(int(c[0])))
    first_stop = greedy[0, 2:].tolist().index(stop) + 3
    assert out.shape[1] == first_stop and int(out[0, -1]) == stop
    assert seen == out[0, 2:].tolist()


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.tensor([[1]]), 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.tensor([[1]]), 3, top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, torch.tensor([[1]]), 3, top_k=0)


def test_sample_command_streams_and_is_reproducible(tmp_path, capsys):
    torch.manual_seed(0)
    tokenizer = make_tokenizer("byte")
    model = MemoryMosaic(MemoryMosaicConfig(**{**SHAPE, "vocab_size": 320}, pmem_size=16))  # padded vocab
    model.save_pretrained(tmp_path / "run" / "checkpoint")
    tokenizer.save(tmp_path / "run" / "checkpoint" / "tokenizer")
    argv = ["sample", "--ckpt", str(tmp_path / "run"), "--prompt", "Tom ", "--max-new-tokens", "12"]
    argv += ["--seed", "3"]
    assert main([*argv, "--json", str(tmp_path / "s.json")]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Tom ")
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    sample = json.loads((tmp_path / "s.json").read_text())["samples"][0]
    assert first == "Tom " + sample + "\n"
    assert main([*argv[:-2], "--top-p", "1.5"]) == 2
    assert "--top-p" in capsys.readouterr().err
    # A bound at least as long as the sequence changes nothing (the padded-vocab wrapper keeps the state).
    assert main([*argv, "--memory-size", "64", "--eviction", "lru"]) == 0
    assert capsys.readouterr().out == first
    assert main([*argv, "--memory-size", "4", "--eviction", "fifo", "--retrieval", "lsh"]) == 0
    assert capsys.readouterr().out.startswith("Tom ")
    assert main([*argv, "--memory-size", "0"]) == 2
    refused = capsys.readouterr()
    assert "memory_size must be >= 1" in refused.err
    assert refused.out == ""  # nothing echoed before the refusal


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


def test_negative_max_new_tokens_is_refused_and_zero_returns_the_prompt():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(tiny_mosaic(), torch.zeros(1, 2, dtype=torch.long), -1)
    assert generate(tiny_mosaic(), torch.zeros(1, 2, dtype=torch.long), 0).shape == (1, 2)
