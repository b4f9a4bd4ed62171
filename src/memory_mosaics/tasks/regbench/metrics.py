"""RegBench metrics, defined exactly as the benchmark's code computes them.

At input position t the "current string" is the text after the last '|' up to and including
token t; the DFA state it reaches decides which letters may come next.

- accuracy: the greedy (argmax over all 20 tokens) prediction is correct when the DFA accepts the
  current string extended by it, i.e. the transition exists. '|' and '.' predictions are always
  wrong. Positions whose true next token is '|' are skipped. Not an exact match with the sample.
- tvd: sum over the vocabulary of |p_model(v) - p_DFA(v)|, where p_DFA is uniform over the
  letters allowed next (zero on '|' and '.'), at every input position including those followed
  by '|', averaged over positions. Like the benchmark, no 1/2 factor: it is the mean L1 distance.

Both are averaged over all scored positions of a split (the benchmark averages per batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memory_mosaics.errors import MosaicError
from memory_mosaics.tasks.regbench.data import SEP_ID, VOCAB, VOCAB_SIZE, Prompt


def next_symbol_masks(prompt: Prompt, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each input position of the (cropped) prompt: which tokens the DFA allows next
    (bool, (n, V)) and whether the true next token is the separator (bool, (n,))."""
    tokens = prompt.tokens[:max_len] if max_len else prompt.tokens
    n = len(tokens) - 1
    allowed = torch.zeros(n, VOCAB_SIZE, dtype=torch.bool)
    state = 0
    for t in range(n):
        token = tokens[t]
        state = 0 if token == SEP_ID else prompt.dfa.step(state, VOCAB[token])
        if state is None:
            raise MosaicError(f"prompt {prompt.text[:60]!r}... is not accepted by its DFA at token {t}")
        for symbol in prompt.dfa.next_symbols(state):
            allowed[t, VOCAB.index(symbol)] = True
    target_is_sep = torch.tensor([tokens[t + 1] == SEP_ID for t in range(n)], dtype=torch.bool)
    return allowed, target_is_sep


@dataclass
class MetricSums:
    """Running sums; `accuracy` and `tvd` are the benchmark's numbers once a split is scored."""

    correct: float = 0.0
    scored: int = 0
    l1: float = 0.0
    positions: int = 0

    def add(self, other: MetricSums) -> None:
        self.correct += other.correct
        self.scored += other.scored
        self.l1 += other.l1
        self.positions += other.positions

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.scored, 1)

    @property
    def tvd(self) -> float:
        return self.l1 / max(self.positions, 1)


def score_probs(probs: torch.Tensor, masks: list[tuple[torch.Tensor, torch.Tensor]]) -> MetricSums:
    """Score next-token distributions `probs` (B, W, V) against each prompt's masks (from
    `next_symbol_masks`); positions beyond a prompt's length are padding and ignored."""
    sums = MetricSums()
    probs = probs.float()
    for b, (allowed, target_is_sep) in enumerate(masks):
        n = allowed.shape[0]
        p = probs[b, :n]
        p_dfa = allowed.float() / allowed.sum(-1, keepdim=True).clamp_min(1)
        sums.l1 += (p - p_dfa).abs().sum().item()
        sums.positions += n
        hit = allowed.gather(1, p.argmax(-1, keepdim=True)).squeeze(1)
        keep = ~target_is_sep
        sums.correct += hit[keep].sum().item()
        sums.scored += int(keep.sum().item())
    return sums


def score_logits(logits: torch.Tensor, masks: list[tuple[torch.Tensor, torch.Tensor]]) -> MetricSums:
    """`score_probs` for raw logits: p_model is the softmax over all tokens."""
    return score_probs(torch.softmax(logits.float(), dim=-1), masks)
