"""In-context n-gram predictors: a training-free anchor for the RegBench numbers.

At each position, predict the next letter from the counts of what followed the same last n-1
tokens earlier in the same prompt ('|' included as context, so a string's first letter is
predicted from what followed earlier separators), backing off to shorter contexts when the
current one was never seen, and to a uniform guess over the letters when nothing was. Akyürek
et al. find that transformers solve RegBench with such "n-gram heads"; these counts show what
that strategy alone scores under the benchmark's metrics.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from memory_mosaics.tasks.regbench.data import SEP_ID, VOCAB_SIZE, Prompt
from memory_mosaics.tasks.regbench.metrics import MetricSums, next_symbol_masks, score_probs

LETTER_IDS = [i for i in range(VOCAB_SIZE) if i not in (0, SEP_ID)]


def ngram_probs(tokens: tuple[int, ...] | list[int], order: int) -> torch.Tensor:
    """Next-token distributions (len(tokens) - 1, V) of the in-context `order`-gram with backoff."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    positions = len(tokens) - 1
    probs = torch.zeros(positions, VOCAB_SIZE)
    # counts[k][context of k tokens] = Counter of the letters that followed it so far.
    counts: list[defaultdict[tuple[int, ...], Counter]] = [defaultdict(Counter) for _ in range(order)]
    for t in range(positions):
        if tokens[t] != SEP_ID:  # record what followed each context ending just before t
            for k in range(min(order, t + 1)):
                counts[k][tuple(tokens[t - k : t])][tokens[t]] += 1
        seen = None
        for k in range(min(order - 1, t + 1), -1, -1):  # longest context first
            seen = counts[k].get(tuple(tokens[t + 1 - k : t + 1]))
            if seen:
                break
        if seen:
            total = sum(seen.values())
            for token, count in seen.items():
                probs[t, token] = count / total
        else:
            probs[t, LETTER_IDS] = 1 / len(LETTER_IDS)
    return probs


def score_ngram(prompts: list[Prompt], order: int, max_len: int | None = None) -> MetricSums:
    """Accuracy and TVD sums of the in-context `order`-gram on `prompts` (cropped to max_len)."""
    sums = MetricSums()
    for prompt in prompts:
        tokens = prompt.tokens[:max_len] if max_len else prompt.tokens
        sums.add(score_probs(ngram_probs(tokens, order)[None], [next_symbol_masks(prompt, max_len)]))
    return sums
