"""The shipped prompt suite is well formed, and scoring ranks continuations by log-likelihood."""

import json

import pytest
import torch

from memory_mosaics import GPT, GPTConfig
from memory_mosaics.data.tokenizers import make_tokenizer
from memory_mosaics.errors import MosaicError
from memory_mosaics.experiments.prompts import (
    CATEGORIES,
    PromptItem,
    continuation_logprobs,
    load_prompt_suite,
    score_prompt_suite,
)


def test_shipped_suite_has_enough_well_formed_prompts_in_every_category():
    items = load_prompt_suite()
    assert len(items) >= 60
    counts = {c: sum(item.category == c for item in items) for c in CATEGORIES}
    assert all(n >= 20 for n in counts.values()), counts
    assert len({item.id for item in items}) == len(items)
    assert len({item.prompt for item in items}) == len(items)  # no prompt asked twice
    for item in items:
        assert item.incorrect and item.correct not in item.incorrect
        # Continuations follow the prompt after a space, so they tokenize as inside one text.
        assert all(c.startswith(" ") and c.strip() for c in item.candidates), item.id
        assert not item.prompt.endswith(" "), item.id


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "a", "category": "poetry", "prompt": "p", "correct": " x", "incorrect": [" y"]}', "category"),
        ('{"id": "a", "category": "factual", "prompt": "p", "correct": " x", "incorrect": []}', "incorrect"),
        ('{"id": "a", "category": "factual", "prompt": "p", "correct": " x", "incorrect": [" x"]}', "differ"),
        ('{"id": "a", "category": "factual", "prompt": "p", "correct": " x"}', "keys"),
        ("not json", "JSON"),
    ],
)
def test_malformed_suite_lines_are_refused_with_the_line_number(tmp_path, line, message):
    path = tmp_path / "suite.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(MosaicError, match=message) as err:
        load_prompt_suite(path)
    assert "line 1" in str(err.value)


def test_continuation_logprobs_match_a_direct_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    context, conts = [1, 2, 3], [[4, 5], [6]]
    got = continuation_logprobs(model, context, conts)
    for cont, values in zip(conts, got, strict=True):
        logits, _ = model(torch.tensor([context + cont]))
        logp = torch.log_softmax(logits[0], -1)
        expected = [logp[len(context) - 1 + i, tok].item() for i, tok in enumerate(cont)]
        assert values == pytest.approx(expected, abs=1e-5)


def test_scoring_counts_an_item_right_only_when_the_correct_continuation_is_most_likely(tmp_path):
    tokenizer = make_tokenizer("byte")

    class Prefers(torch.nn.Module):
        """A fake model whose next-token distribution always favours the byte of `letter`."""

        def __init__(self, letter: str):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.favourite = tokenizer.encode(letter)[0]

        def forward(self, idx):
            logits = torch.zeros(*idx.shape, tokenizer.vocab_size)
            logits[..., self.favourite] = 5.0
            return logits + self.weight, None

    items = [
        PromptItem("f-1", "factual", "The", " aaa", (" bbb",)),
        PromptItem("l-1", "logical", "The", " bbb", (" aaa", " ccc")),
    ]
    result = score_prompt_suite(Prefers("a"), tokenizer, items)
    rights = {row["id"]: row["right_by_total"] for row in result["items"]}
    assert rights == {"f-1": True, "l-1": False}
    summary = result["summary"]
    assert summary["overall"] == {
        "n": 2, "right": 1, "accuracy": 0.5, "accuracy_by_mean": 0.5, "chance": pytest.approx((1 / 2 + 1 / 3) / 2)
    }  # fmt: skip
    assert summary["factual"]["right"] == 1 and summary["logical"]["right"] == 0
    json.dumps(result)  # the whole result is JSON-ready
