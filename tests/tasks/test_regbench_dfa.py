"""Random DFAs: deterministic, minimal, trimmed, language-preserving, canonical and de-duplicated,
and drawn exactly as the benchmark draws them (checked against its own generator's output)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from memory_mosaics.tasks.regbench.data import load_reference
from memory_mosaics.tasks.regbench.dfa import (
    DFA,
    canonical_minimal_dfa,
    random_dfa,
    random_edges,
    unique_random_dfas,
)

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "regbench_seed0.json"


def equivalent_pairs(dfa: DFA) -> set[tuple[int, int]]:
    """Table filling (independent of the Moore refinement under test): state pairs no string
    distinguishes. Two states differ if one has a letter the other lacks, or a shared letter
    leads to a differing pair."""
    states = range(dfa.num_states)
    different: set[tuple[int, int]] = set()
    changed = True
    while changed:
        changed = False
        for p, q in itertools.combinations(states, 2):
            if (p, q) in different:
                continue
            if set(dfa.next_symbols(p)) != set(dfa.next_symbols(q)) or any(
                tuple(sorted((dfa.step(p, a), dfa.step(q, a)))) in different for a in dfa.next_symbols(p)
            ):
                different.add((p, q))
                changed = True
    return {pair for pair in itertools.combinations(states, 2) if pair not in different}


def same_language(edges: list[dict[str, int]], dfa: DFA) -> bool:
    """Walk the product of the raw automaton and the minimal one from their starts: at every
    reachable pair of states both must allow exactly the same letters."""
    seen, stack = {(0, 0)}, [(0, 0)]
    while stack:
        raw, small = stack.pop()
        if set(edges[raw]) != set(dfa.next_symbols(small)):
            return False
        for letter, target in edges[raw].items():
            pair = (target, dfa.step(small, letter))
            if pair not in seen:
                seen.add(pair)
                stack.append(pair)
    return True


def test_hand_built_dfa_is_minimised_trimmed_and_renumbered():
    # 0 -a-> 1, 0 -b-> 2; 1 and 2 both loop back with 'c' only: equivalent, so they merge.
    # State 3 is unreachable and must be trimmed.
    edges = [{"a": 1, "b": 2}, {"c": 0}, {"c": 0}, {"a": 0}]
    dfa = canonical_minimal_dfa(edges)
    assert dfa.transitions == ((("a", 1), ("b", 1)), (("c", 0),))
    assert dfa.accepts("acbc") and dfa.accepts("") and not dfa.accepts("ab")
    assert dfa.run("ac") == 0 and dfa.run("b") == 1 and dfa.run("z") is None


def test_start_state_and_numbering_are_canonical():
    # The same language written with other state numbers and another start state.
    a = canonical_minimal_dfa([{"x": 1}, {"y": 2, "z": 0}, {"x": 1}])
    b = canonical_minimal_dfa([{"y": 2, "z": 1}, {"x": 0}, {"x": 0}], start=1)
    assert a == b and hash(a) == hash(b)
    assert a != canonical_minimal_dfa([{"x": 1}, {"y": 0}])


@pytest.mark.parametrize("seed", range(6))
def test_random_dfas_are_minimal_trimmed_deterministic_and_equivalent(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        edges, _ = random_edges(rng)
        dfa = canonical_minimal_dfa(edges)
        # The recipe: 4-12 states, 1-3 edges to distinct other states, alphabet of 4-18 letters.
        assert 4 <= len(edges) <= 12
        for state, out in enumerate(edges):
            assert 1 <= len(out) <= 3 and state not in out.values()
            assert len(set(out.values())) == len(out)
        # Deterministic: each state's letters are distinct (a tuple of pairs could repeat one).
        for state in range(dfa.num_states):
            assert len(set(dfa.next_symbols(state))) == len(dfa.next_symbols(state)) >= 1
        # Trimmed: every state is reached from the start in canonical BFS order.
        reached = {0} | {target for row in dfa.transitions for _, target in row}
        assert reached == set(range(dfa.num_states))
        assert equivalent_pairs(dfa) == set()
        assert same_language(edges, dfa)
        assert dfa.num_states <= len(edges)


def test_sampled_strings_are_accepted():
    rng = np.random.default_rng(3)
    for _ in range(30):
        dfa, walk_seed = random_dfa(rng)
        walk = np.random.default_rng(walk_seed)
        for length in (1, 7, 49):
            string = dfa.sample_string(length, walk)
            assert len(string) == length and dfa.accepts(string)


def test_unique_dfas_have_no_duplicates_and_stop_at_count():
    found = unique_random_dfas(np.random.default_rng(0), 300, 3000)
    dfas = [dfa for dfa, _ in found]
    assert len(dfas) == 300 == len(set(dfas))
    assert len({dfa.transitions for dfa in dfas}) == 300


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"benchmark reference data not found at {REFERENCE}")
def test_seed_0_draws_the_benchmarks_languages():
    """The benchmark's own generator (seed 0, 2000 DFAs) wrote regbench_seed0.json: our draw of
    the first 2000 distinct languages from seed 0 contains every language it contains."""
    reference = load_reference(REFERENCE)
    theirs = {p.dfa for p in reference.train + reference.val + reference.test}
    ours = {dfa for dfa, _ in unique_random_dfas(np.random.default_rng(0), 2000, 20000)}
    # pythomata's hash de-duplication kept two renamed copies of the same language: 1998 remain.
    assert len(theirs) == 1998
    assert theirs <= ours
    config = json.loads(REFERENCE.read_text())["config"]
    assert (config["num_examples"], config["num_test_examples"], config["seed"]) == (1000, 1000, 0)
