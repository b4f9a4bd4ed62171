"""RegBench: in-context learning of random regular languages (Akyürek et al., 2024).

`generate_regbench` draws the data set, `metrics` scores next-token distributions the way the
benchmark does, and `harness.run_model` trains and tests one registered model.
"""

from memory_mosaics.tasks.regbench.data import (
    VOCAB,
    VOCAB_SIZE,
    Prompt,
    RegBenchConfig,
    RegBenchSplits,
    generate_regbench,
    load_reference,
    make_batch,
)
from memory_mosaics.tasks.regbench.dfa import DFA, canonical_minimal_dfa, random_dfa
from memory_mosaics.tasks.regbench.harness import RunResult, TrainConfig, run_model, train_and_test
from memory_mosaics.tasks.regbench.metrics import MetricSums, next_symbol_masks, score_logits, score_probs

__all__ = [
    "DFA",
    "VOCAB",
    "VOCAB_SIZE",
    "MetricSums",
    "Prompt",
    "RegBenchConfig",
    "RegBenchSplits",
    "RunResult",
    "TrainConfig",
    "canonical_minimal_dfa",
    "generate_regbench",
    "load_reference",
    "make_batch",
    "next_symbol_masks",
    "random_dfa",
    "run_model",
    "score_logits",
    "score_probs",
    "train_and_test",
]
