"""RegBench accuracy and TVD on hand-built DFAs with hand-computed values, and an oracle built
from the benchmark's own DFAs scoring perfectly on its data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memory_mosaics.tasks.regbench.data import SEP_ID, VOCAB, VOCAB_SIZE, Prompt, encode, load_reference
from memory_mosaics.tasks.regbench.dfa import canonical_minimal_dfa
from memory_mosaics.tasks.regbench.metrics import MetricSums, next_symbol_masks, score_logits, score_probs
from memory_mosaics.tasks.regbench.ngram import ngram_probs, score_ngram

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "regbench_seed0.json"

# State 0 allows a or b (both lead to 1); state 1 allows c (back to 0).
DFA_AB_C = canonical_minimal_dfa([{"a": 1, "b": 1}, {"c": 0}])
# Inputs a c b | b (targets c b | b c): states after each input 1, 0, 1, 0 (after '|'), 1,
# so the allowed next letters are {c}, {a,b}, {c}, {a,b}, {c}; the third target is '|'.
PROMPT = Prompt(DFA_AB_C, encode("a c b | b c"))
ALLOWED_COUNTS = [1, 2, 1, 2, 1]


def probs_for(rows: list[dict[str, float]]) -> torch.Tensor:
    probs = torch.zeros(1, len(rows), VOCAB_SIZE)
    for t, row in enumerate(rows):
        for symbol, p in row.items():
            probs[0, t, VOCAB.index(symbol)] = p
    return probs


def test_masks_follow_the_dfa_and_restart_after_separators():
    allowed, target_is_sep = next_symbol_masks(PROMPT)
    assert allowed.sum(-1).tolist() == ALLOWED_COUNTS
    assert allowed[1, VOCAB.index("a")] and allowed[3, VOCAB.index("b")] and allowed[4, VOCAB.index("c")]
    assert target_is_sep.tolist() == [False, False, True, False, False]
    cropped, cropped_sep = next_symbol_masks(PROMPT, max_len=3)
    assert torch.equal(cropped, allowed[:2]) and cropped_sep.tolist() == [False, False]


def test_oracle_scores_accuracy_one_and_tvd_zero():
    oracle = probs_for([{"c": 1}, {"a": 0.5, "b": 0.5}, {"c": 1}, {"a": 0.5, "b": 0.5}, {"c": 1}])
    sums = score_probs(oracle, [next_symbol_masks(PROMPT)])
    assert sums.accuracy == 1.0 and sums.tvd == pytest.approx(0.0, abs=1e-7)
    assert (sums.scored, sums.positions) == (4, 5)  # the '|' target is skipped by accuracy only


def test_uniform_predictor_over_all_tokens():
    # sum |1/20 - p_dfa| = m (1/m - 1/20) + (20 - m)/20 = 2 (1 - m/20): 1.9 for m=1, 1.8 for m=2.
    # Its argmax is token 0, the pad '.', which is always wrong.
    uniform = torch.full((1, 5, VOCAB_SIZE), 1 / VOCAB_SIZE)
    sums = score_probs(uniform, [next_symbol_masks(PROMPT)])
    assert sums.tvd == pytest.approx((3 * 1.9 + 2 * 1.8) / 5)
    assert sums.accuracy == 0.0


def test_uniform_predictor_over_letters():
    # sum = 2 (1 - m/18); argmax is 'a', allowed at the two scored positions in state 0 out of 4.
    letters = probs_for([dict.fromkeys("abcdefghijklmnopqr", 1 / 18)] * 5)
    sums = score_probs(letters, [next_symbol_masks(PROMPT)])
    assert sums.tvd == pytest.approx((3 * (2 - 2 / 18) + 2 * (2 - 4 / 18)) / 5)
    assert sums.accuracy == 0.5


def test_predicting_the_sampled_token_is_not_the_dfa_distribution():
    # One-hot on the true next token: always accepted (accuracy 1), but its L1 distance is
    # 2 (1 - 1/m) on letters and 2 on the '|' target, which TVD counts: (0 + 1 + 2 + 1 + 0) / 5.
    one_hot = probs_for([{"c": 1}, {"b": 1}, {"|": 1}, {"b": 1}, {"c": 1}])
    sums = score_probs(one_hot, [next_symbol_masks(PROMPT)])
    assert sums.accuracy == 1.0 and sums.tvd == pytest.approx(4 / 5)


def test_padding_positions_are_ignored_and_sums_accumulate():
    short = Prompt(DFA_AB_C, encode("a c"))
    oracle = probs_for([{"c": 1}, {"a": 0.5, "b": 0.5}, {"c": 1}, {"a": 0.5, "b": 0.5}, {"c": 1}])
    garbage_tail = oracle.clone()
    garbage_tail[0, 1:] = 1 / VOCAB_SIZE  # beyond the short prompt's single position
    total = MetricSums()
    total.add(score_probs(torch.cat([oracle, garbage_tail]), [next_symbol_masks(PROMPT), next_symbol_masks(short)]))
    assert (total.positions, total.scored) == (6, 5)
    assert total.accuracy == 1.0 and total.tvd == pytest.approx(0.0, abs=1e-7)


def test_score_logits_applies_the_softmax():
    logits = torch.randn(1, 5, VOCAB_SIZE)
    direct = score_probs(torch.softmax(logits, -1), [next_symbol_masks(PROMPT)])
    via = score_logits(logits, [next_symbol_masks(PROMPT)])
    assert via.tvd == pytest.approx(direct.tvd) and via.accuracy == direct.accuracy


def reference_oracle(row: dict) -> torch.Tensor:
    """The DFA's next-symbol distribution at each input position, walked directly on the
    benchmark's own transition table (its state labels, its start state): independent of the
    canonical DFAs and the masks under test."""
    tokens = row["prompt"].split()
    probs = torch.zeros(1, len(tokens) - 1, VOCAB_SIZE)
    state = str(row["initial_state"])
    for t, symbol in enumerate(tokens[:-1]):
        state = str(row["initial_state"]) if symbol == "|" else str(row["transitions"][state][symbol])
        allowed = row["transitions"][state]
        for letter in allowed:
            probs[0, t, VOCAB.index(letter)] = 1 / len(allowed)
    return probs


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"benchmark reference data not found at {REFERENCE}")
def test_oracle_on_the_benchmarks_own_test_split():
    rows = json.loads(REFERENCE.read_text())["test"][:60]
    prompts = load_reference(REFERENCE).test[:60]
    total = MetricSums()
    for row, prompt in zip(rows, prompts, strict=True):
        assert prompt.tokens == encode(row["prompt"])
        total.add(score_probs(reference_oracle(row), [next_symbol_masks(prompt)]))
    assert total.accuracy == 1.0 and total.tvd == pytest.approx(0.0, abs=1e-6)
    assert total.scored == total.positions - sum(p.tokens.count(SEP_ID) for p in prompts)


def test_in_context_bigram_counts_with_backoff():
    # Prompt "a b a b | a b a": what followed the current token earlier in the prompt, else the
    # letters seen so far ('|' is context, never a prediction).
    probs = ngram_probs(encode("a b a b | a b a"), order=2)
    a, b = VOCAB.index("a"), VOCAB.index("b")
    expected = [{a: 1.0}, {a: 0.5, b: 0.5}, {b: 1.0}, {a: 1.0}, {a: 0.5, b: 0.5}, {b: 1.0}, {a: 1.0}]
    assert probs.shape == (7, VOCAB_SIZE)
    for t, row in enumerate(expected):
        want = torch.zeros(VOCAB_SIZE)
        for token, p in row.items():
            want[token] = p
        assert torch.allclose(probs[t], want), t
    # With no letter seen yet (a prompt opening with "|") the guess is uniform over the 18 letters.
    assert torch.allclose(ngram_probs(encode("| c"), order=3)[0, 1:19], torch.full((18,), 1 / 18))
    sums = score_ngram([PROMPT], order=1)
    assert sums.positions == 5 and 0.0 <= sums.accuracy <= 1.0
