"""Random deterministic finite automata for RegBench (Akyürek et al., 2024).

A RegBench language is given by a small random DFA whose states are all accepting: a string is in
the language when every one of its transitions exists. Missing transitions mean "reject", so the
implicit dead state is the only rejecting one.

The random draw follows the benchmark's recipe (see docs/regbench.md): 4-12 states, an alphabet of
4-18 letters, 1-3 outgoing edges per state to distinct *other* states, start state 0. Each draw is
then minimised (Moore's partition refinement, written here), trimmed to the states reachable from
the start, and renumbered in a canonical breadth-first order. Because the minimal DFA of a
language is unique up to renaming, two draws describe the same language exactly when their
canonical forms are equal, which is what de-duplication compares.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqr")


@dataclass(frozen=True)
class DFA:
    """A DFA over letters whose states are all accepting; the start state is 0.

    `transitions[s]` maps a letter to the next state; a letter missing from it is rejected.
    Instances built by `canonical_minimal_dfa` are minimal, trimmed and canonically numbered, so
    `==` and `hash` compare languages.
    """

    transitions: tuple[tuple[tuple[str, int], ...], ...]

    @property
    def num_states(self) -> int:
        return len(self.transitions)

    @property
    def alphabet(self) -> tuple[str, ...]:
        return tuple(sorted({sym for edges in self.transitions for sym, _ in edges}))

    def next_symbols(self, state: int) -> tuple[str, ...]:
        """The letters that may follow a string ending in `state` (sorted)."""
        return tuple(sym for sym, _ in self.transitions[state])

    def step(self, state: int, symbol: str) -> int | None:
        """The state after reading `symbol` from `state`, or None if the DFA rejects it."""
        for sym, target in self.transitions[state]:
            if sym == symbol:
                return target
        return None

    def run(self, string: str | list[str]) -> int | None:
        """The state reached from the start by reading `string`, or None if it is rejected."""
        state: int | None = 0
        for symbol in string:
            state = self.step(state, symbol)
            if state is None:
                return None
        return state

    def accepts(self, string: str | list[str]) -> bool:
        return self.run(string) is not None

    def sample_string(self, length: int, rng: np.random.Generator) -> str:
        """A uniform random walk of `length` steps from the start: each step picks uniformly
        among the current state's outgoing letters. Every prefix is accepted."""
        state, out = 0, []
        for _ in range(length):
            edges = self.transitions[state]
            symbol, state = edges[int(rng.integers(len(edges)))]
            out.append(symbol)
        return "".join(out)


def canonical_minimal_dfa(edges: list[dict[str, int]], start: int = 0) -> DFA:
    """Minimise, trim and canonically renumber a partial DFA whose states are all accepting.

    `edges[s]` maps letters to next states; states may be any integers in range(len(edges)).
    """
    reachable = _reachable(edges, start)
    blocks = _moore_blocks(edges, reachable)
    # One representative per block; its edges, mapped onto blocks, are the block's edges.
    rep = {}
    for state in reachable:
        rep.setdefault(blocks[state], state)
    # Canonical numbering: breadth-first from the start block, letters in sorted order.
    order = {blocks[start]: 0}
    queue = deque([blocks[start]])
    canonical: list[tuple[tuple[str, int], ...]] = []
    while queue:
        block = queue.popleft()
        row = []
        for symbol, target in sorted(edges[rep[block]].items()):
            target_block = blocks[target]
            if target_block not in order:
                order[target_block] = len(order)
                queue.append(target_block)
            row.append((symbol, order[target_block]))
        canonical.append(tuple(row))
    return DFA(tuple(canonical))


def _reachable(edges: list[dict[str, int]], start: int) -> list[int]:
    seen, queue = {start}, deque([start])
    while queue:
        for target in edges[queue.popleft()].values():
            if target not in seen:
                seen.add(target)
                queue.append(target)
    return sorted(seen)


def _moore_blocks(edges: list[dict[str, int]], states: list[int]) -> dict[int, int]:
    """Moore's algorithm: the coarsest partition of `states` into equivalence classes.

    All real states are accepting and the implicit dead state (-1) is not, so the first partition
    puts every real state in one block. A block splits while its states disagree, for some
    letter, on the block of the next state (the dead state being its own block).
    """
    alphabet = sorted({sym for s in states for sym in edges[s]})
    block = dict.fromkeys(states, 0)
    while True:
        signatures = {s: (block[s], *(block[edges[s][a]] if a in edges[s] else -1 for a in alphabet)) for s in states}
        # Number the new blocks in order of first appearance so the result is deterministic.
        ids: dict[tuple[int, ...], int] = {}
        new_block = {s: ids.setdefault(signatures[s], len(ids)) for s in states}
        if len(ids) == len(set(block.values())):
            return new_block
        block = new_block


def random_edges(
    rng: np.random.Generator,
    min_states: int = 4,
    max_states: int = 12,
    min_alphabet: int = 4,
    max_edges: int = 3,
) -> tuple[list[dict[str, int]], int]:
    """Draw one raw random DFA the way RegBench does; returns (edges per state, walk seed).

    The master `rng` draws the number of states, the alphabet and a seed for a per-DFA generator;
    that generator draws each state's 1..`max_edges` edges (distinct letters to distinct other
    states), then one more integer that seeds the DFA's random walks.
    """
    num_states = int(rng.integers(min_states, max_states + 1))
    alphabet_size = int(rng.integers(min_alphabet, len(LETTERS) + 1))
    alphabet = list(rng.choice(np.array(LETTERS), size=alphabet_size, replace=False))
    sub = np.random.default_rng(int(rng.integers(0, 2**32)))
    edges: list[dict[str, int]] = []
    for state in range(num_states):
        count = int(sub.integers(1, max_edges + 1))
        symbols = sub.choice(np.array(alphabet), size=count, replace=False)
        others = np.array([s for s in range(num_states) if s != state])
        targets = sub.choice(others, size=count, replace=False)
        edges.append({str(a): int(t) for a, t in zip(symbols, targets, strict=True)})
    return edges, int(sub.integers(0, 2**32))


def random_dfa(rng: np.random.Generator, **limits: int) -> tuple[DFA, int]:
    """A random DFA (`random_edges`), minimised, trimmed and canonical; with its walk seed."""
    edges, walk_seed = random_edges(rng, **limits)
    return canonical_minimal_dfa(edges), walk_seed


def unique_random_dfas(rng: np.random.Generator, count: int, max_attempts: int, **limits: int) -> list[tuple[DFA, int]]:
    """Draw random DFAs until `count` distinct languages are found or `max_attempts` draws are
    spent; returns them in order of first appearance (no dependence on Python's hash seed)."""
    found: dict[DFA, int] = {}
    for _ in range(max_attempts):
        dfa, walk_seed = random_dfa(rng, **limits)
        found.setdefault(dfa, walk_seed)
        if len(found) >= count:
            break
    return list(found.items())
