"""RegBench prompts, splits, batches and reproducibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memory_mosaics.errors import ConfigError
from memory_mosaics.tasks.regbench.data import (
    IGNORE,
    PAD_ID,
    SEP_ID,
    VOCAB,
    RegBenchConfig,
    encode,
    generate_regbench,
    load_reference,
    make_batch,
)

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "regbench_seed0.json"


@pytest.fixture(scope="module")
def splits():
    return generate_regbench(RegBenchConfig(num_train=60, num_test=40, seed=5))


def test_vocabulary_is_the_benchmarks():
    assert (".", *"abcdefghijklmnopqr", "|") == VOCAB
    assert (PAD_ID, SEP_ID) == (0, 19)
    assert encode("a r | b") == (1, 18, 19, 2)


def test_splits_are_disjoint_by_dfa_and_sized(splits):
    assert (len(splits.train), len(splits.val), len(splits.test)) == (60, 20, 20)
    groups = [{p.dfa for p in split} for split in (splits.train, splits.val, splits.test)]
    assert sum(len(g) for g in groups) == 100 == len(set.union(*groups))


def test_prompts_follow_the_recipe(splits):
    for prompt in splits.train + splits.val + splits.test:
        text = "".join(VOCAB[t] for t in prompt.tokens)
        strings = text.split("|")
        assert 10 <= len(strings) <= 19
        for string in strings:
            assert 1 <= len(string) <= 49
            assert prompt.dfa.accepts(string)
        assert prompt.text == " ".join(text)


def test_same_seed_same_data_other_seed_other_data(splits):
    again = generate_regbench(RegBenchConfig(num_train=60, num_test=40, seed=5))
    assert [p.tokens for p in again.train + again.val + again.test] == [
        p.tokens for p in splits.train + splits.val + splits.test
    ]
    other = generate_regbench(RegBenchConfig(num_train=60, num_test=40, seed=6))
    assert [p.tokens for p in other.train] != [p.tokens for p in splits.train]


def test_data_do_not_depend_on_pythons_hash_seed(splits):
    """A fresh interpreter with another PYTHONHASHSEED (sets and str hashes change) draws the
    same prompts."""
    code = (
        "import json\n"
        "from memory_mosaics.tasks.regbench.data import RegBenchConfig, generate_regbench\n"
        "s = generate_regbench(RegBenchConfig(num_train=60, num_test=40, seed=5))\n"
        "print(json.dumps([list(p.tokens) for p in s.train + s.val + s.test]))\n"
    )
    hashes = []
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        hashes.append(json.loads(out.stdout))
    expected = [list(p.tokens) for p in splits.train + splits.val + splits.test]
    assert hashes[0] == expected and hashes[1] == expected


def test_too_few_languages_shrink_both_counts_proportionally():
    # One draw per wanted DFA at most: duplicates make the set smaller than asked.
    config = RegBenchConfig(num_train=300, num_test=300, seed=0, max_states=4, max_attempts_factor=1)
    small = generate_regbench(config)
    total = len(small.train) + len(small.val) + len(small.test)
    assert total < 600
    assert len(small.train) == total * 300 // 600
    assert abs(len(small.val) - len(small.test)) <= 1


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ConfigError, match="num_train"):
        RegBenchConfig(num_train=0)
    with pytest.raises(ConfigError, match="max_edges"):
        RegBenchConfig(max_edges=4)


def test_make_batch_pads_and_ignores_separators(splits):
    prompts = splits.train[:3]
    idx, targets = make_batch(prompts)
    longest = max(len(p.tokens) for p in prompts)
    assert idx.shape == targets.shape == (3, longest - 1)
    for row, prompt in enumerate(prompts):
        n = len(prompt.tokens) - 1
        tokens = torch.tensor(prompt.tokens)
        assert torch.equal(idx[row, :n], tokens[:-1])
        assert (idx[row, n:] == PAD_ID).all() and (targets[row, n:] == IGNORE).all()
        expected = torch.where(tokens[1:] == SEP_ID, IGNORE, tokens[1:])
        assert torch.equal(targets[row, :n], expected)
    cropped, cropped_targets = make_batch(prompts, max_len=20)
    assert cropped.shape == (3, 19) and torch.equal(cropped, idx[:, :19])
    assert torch.equal(cropped_targets, targets[:, :19])


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"benchmark reference data not found at {REFERENCE}")
def test_generator_matches_the_benchmarks_statistics():
    """The reference notes: 10-19 strings, 377 tokens on average (max 671), 7.0 states."""
    reference = load_reference(REFERENCE)
    ours = generate_regbench(RegBenchConfig(num_train=1000, num_test=1000, seed=0))
    for split in (reference, ours):
        prompts = split.train + split.val + split.test
        mean_tokens = sum(len(p.tokens) for p in prompts) / len(prompts)
        mean_states = sum(p.dfa.num_states for p in prompts) / len(prompts)
        assert abs(mean_tokens - 377) < 3 and abs(mean_states - 7.0) < 0.05
        assert max(len(p.tokens) for p in prompts) == 671
