"""RegBench prompts: one per DFA, 10-19 random strings of the DFA's language joined by '|'.

Vocabulary: the 18 letters 'a'..'r' plus the pad '.' and the separator '|', numbered in sorted
order, so '.' is 0, 'a'..'r' are 1..18 and '|' is 19 (the benchmark's ids).

`generate_regbench(RegBenchConfig(...))` is fully determined by its seed: one master
`numpy.random.default_rng(seed)` draws the DFAs, shuffles them, and draws each prompt's string
count and lengths; each DFA's walks use their own generator seeded while the DFA was drawn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from memory_mosaics.errors import ConfigError, MosaicError
from memory_mosaics.tasks.regbench.dfa import DFA, LETTERS, canonical_minimal_dfa, unique_random_dfas

PAD, SEP = ".", "|"
VOCAB: tuple[str, ...] = tuple(sorted((PAD, SEP, *LETTERS)))
TOKEN_ID = {symbol: i for i, symbol in enumerate(VOCAB)}
PAD_ID, SEP_ID = TOKEN_ID[PAD], TOKEN_ID[SEP]
VOCAB_SIZE = len(VOCAB)
IGNORE = -1  # target value the models' losses skip


@dataclass(frozen=True)
class Prompt:
    """One RegBench example: a DFA and the token ids of its prompt (strings joined by '|')."""

    dfa: DFA
    tokens: tuple[int, ...]

    @property
    def text(self) -> str:
        return " ".join(VOCAB[t] for t in self.tokens)


@dataclass(frozen=True)
class RegBenchSplits:
    train: list[Prompt]
    val: list[Prompt]
    test: list[Prompt]


@dataclass
class RegBenchConfig:
    """How to draw a RegBench data set; defaults are the benchmark's (`icl_dfa.yaml`).

    `num_test` DFAs are split half/half into test and val. `max_attempts_factor` bounds the draws
    at that many times (num_train + num_test); if fewer distinct languages turn up, both counts
    shrink proportionally, as in the benchmark.
    """

    num_train: int = 1000
    num_test: int = 1000
    seed: int = 0
    min_states: int = 4
    max_states: int = 12
    max_edges: int = 3
    min_strings: int = 10
    max_strings: int = 19
    max_string_len: int = 49
    max_attempts_factor: int = 10

    def __post_init__(self) -> None:
        checks = [
            ("num_train", self.num_train >= 1, "at least 1"),
            ("num_test", self.num_test >= 2, "at least 2 (half val, half test)"),
            ("seed", 0 <= self.seed < 2**63, "in [0, 2^63)"),
            ("min_states", self.min_states >= 4, "at least 4 (3 edges to distinct other states)"),
            ("max_states", self.min_states <= self.max_states, "at least min_states"),
            ("max_edges", 1 <= self.max_edges <= 3, "in [1, 3]"),
            ("min_strings", self.min_strings >= 1, "at least 1"),
            ("max_strings", self.min_strings <= self.max_strings, "at least min_strings"),
            ("max_string_len", self.max_string_len >= 1, "at least 1"),
            ("max_attempts_factor", self.max_attempts_factor >= 1, "at least 1"),
        ]
        for field, ok, expected in checks:
            if not ok:
                raise ConfigError(f"RegBenchConfig.{field} = {getattr(self, field)!r}: expected {expected}")

    def to_dict(self) -> dict:
        return asdict(self)


def encode(text: str) -> tuple[int, ...]:
    """Token ids of a space-separated prompt such as 'a b | c'."""
    try:
        return tuple(TOKEN_ID[s] for s in text.split())
    except KeyError as err:
        raise MosaicError(f"prompt symbol {err.args[0]!r} is not in the RegBench vocabulary {VOCAB}") from None


def make_prompt(dfa: DFA, num_strings: int, lengths: list[int], walk_rng: np.random.Generator) -> Prompt:
    strings = [dfa.sample_string(length, walk_rng) for length in lengths[:num_strings]]
    return Prompt(dfa, encode(" | ".join(" ".join(s) for s in strings)))


def generate_regbench(config: RegBenchConfig) -> RegBenchSplits:
    """Draw distinct DFAs, split them by DFA into train/test/val, and make one prompt per DFA."""
    rng = np.random.default_rng(config.seed)
    wanted = config.num_train + config.num_test
    found = unique_random_dfas(
        rng,
        wanted,
        config.max_attempts_factor * wanted,
        min_states=config.min_states,
        max_states=config.max_states,
        max_edges=config.max_edges,
    )
    order = rng.permutation(len(found))
    found = [found[i] for i in order]
    num_train, num_test = config.num_train, config.num_test
    if len(found) < wanted:
        num_train = len(found) * num_train // wanted
        num_test = len(found) - num_train
    num_test_half = num_test // 2
    groups = {
        "train": found[:num_train],
        "test": found[num_train : num_train + num_test_half],
        "val": found[num_train + num_test_half : num_train + num_test],
    }
    prompts: dict[str, list[Prompt]] = {}
    for split in ("train", "test", "val"):  # the benchmark's order of random draws
        prompts[split] = []
        for dfa, walk_seed in groups[split]:
            num_strings = int(rng.integers(config.min_strings, config.max_strings + 1))
            lengths = [int(rng.integers(1, config.max_string_len + 1)) for _ in range(num_strings)]
            prompts[split].append(make_prompt(dfa, num_strings, lengths, np.random.default_rng(walk_seed)))
    return RegBenchSplits(prompts["train"], prompts["val"], prompts["test"])


def load_reference(path: str | Path) -> RegBenchSplits:
    """Load a data set written by the benchmark's own generator (`regbench_seed0.json` layout:
    rows with `prompt`, `initial_state` and `transitions`)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        splits = {}
        for split in ("train", "val", "test"):
            rows = payload[split]
            splits[split] = [_reference_prompt(row) for row in rows]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise MosaicError(
            f"cannot read RegBench data from {path}: {err!r}; expected JSON with 'train', 'val' and "
            "'test' lists of rows {prompt, initial_state, transitions}"
        ) from None
    return RegBenchSplits(splits["train"], splits["val"], splits["test"])


def _reference_prompt(row: dict) -> Prompt:
    labels = sorted(row["transitions"], key=int)
    index = {int(label): i for i, label in enumerate(labels)}
    edges = [{sym: index[int(t)] for sym, t in row["transitions"][label].items()} for label in labels]
    return Prompt(canonical_minimal_dfa(edges, start=index[int(row["initial_state"])]), encode(row["prompt"]))


def make_batch(prompts: list[Prompt], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for a list of prompts, right-padded to the longest one.

    Inputs are tokens[:-1] padded with '.', targets tokens[1:] with pads and separators set to
    IGNORE, so the loss only counts letters. `max_len` crops each prompt to that many tokens.
    """
    rows = [p.tokens[:max_len] if max_len else p.tokens for p in prompts]
    width = max(len(r) for r in rows) - 1
    idx = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens = torch.tensor(row, dtype=torch.long)
        idx[i, : len(row) - 1] = tokens[:-1]
        targets[i, : len(row) - 1] = tokens[1:]
    targets[targets == SEP_ID] = IGNORE
    return idx, targets
