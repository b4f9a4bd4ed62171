"""A likelihood-ranking prompt suite: generation quality without a grader model.

Each item is a short story opening (`prompt`) with one `correct` continuation and one or more
`incorrect` ones. A model "gets it right" when the correct continuation has the highest
log-likelihood given the prompt. Three categories, in the spirit of the paper's story evaluation:

- factual: knowledge that children's stories carry (the sun is hot, cats meow);
- logical: simple reasoning inside the story (the jar is empty after all the cookies are eaten);
- consistency: names, objects and facts introduced in the prompt reused correctly later.

The suite shipped in `prompts.jsonl` was written for this project (one JSON object per line:
id, category, prompt, correct, incorrect). Continuations start with the space that separates them
from the prompt, so prompt and continuation tokenize as they would inside one text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memory_mosaics.errors import MosaicError

CATEGORIES = ("factual", "logical", "consistency")
SUITE_FILE = "prompts.jsonl"


@dataclass(frozen=True)
class PromptItem:
    id: str
    category: str
    prompt: str
    correct: str
    incorrect: tuple[str, ...]

    @property
    def candidates(self) -> tuple[str, ...]:
        """The correct continuation first, then the incorrect ones."""
        return (self.correct, *self.incorrect)


def _parse_item(line: str, where: str) -> PromptItem:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise MosaicError(f"{where}: not valid JSON ({err})") from None
    expected = {"id", "category", "prompt", "correct", "incorrect"}
    if not isinstance(raw, dict) or set(raw) != expected:
        raise MosaicError(f"{where}: expected an object with exactly the keys {sorted(expected)}")
    if raw["category"] not in CATEGORIES:
        raise MosaicError(f"{where}: category must be one of {', '.join(CATEGORIES)}, got {raw['category']!r}")
    incorrect = raw["incorrect"]
    if not isinstance(incorrect, list) or not incorrect:
        raise MosaicError(f"{where}: incorrect must be a non-empty list of continuations")
    texts = [raw["prompt"], raw["correct"], *incorrect]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise MosaicError(f"{where}: prompt and continuations must be non-empty strings")
    if raw["correct"] in incorrect or len(set(incorrect)) != len(incorrect):
        raise MosaicError(f"{where}: the continuations must all differ")
    return PromptItem(str(raw["id"]), raw["category"], raw["prompt"], raw["correct"], tuple(incorrect))


def load_prompt_suite(path: str | Path | None = None) -> list[PromptItem]:
    """The items of a suite file (default: the suite shipped with the package), checked."""
    if path is None:
        text = (resources.files("memory_mosaics.experiments") / SUITE_FILE).read_text(encoding="utf-8")
        source = f"memory_mosaics/experiments/{SUITE_FILE}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise MosaicError(f"cannot read prompt suite {path}: {err.strerror or err}") from None
        source = str(path)
    items = [_parse_item(line, f"{source} line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise MosaicError(f"{source}: prompt ids must be unique")
    if not items:
        raise MosaicError(f"{source}: the prompt suite is empty")
    return items


@torch.no_grad()
def continuation_logprobs(model: nn.Module, context: list[int], continuations: list[list[int]]) -> list[list[float]]:
    """Log-probability of each token of each continuation after `context`, in float32 (one batch)."""
    device = next(model.parameters()).device
    rows = [context + cont for cont in continuations]
    width = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, : len(row)] = torch.tensor(row)  # right padding is never read by causal models
    was_training = model.training
    model.eval()
    logits, _ = model(idx.to(device))
    model.train(was_training)
    logp = F.log_softmax(logits.float(), dim=-1).cpu()
    start = len(context)
    out = []
    for i, cont in enumerate(continuations):
        positions = torch.arange(start - 1, start - 1 + len(cont))
        out.append(logp[i, positions, torch.tensor(cont)].tolist())
    return out


def score_prompt_suite(model: nn.Module, tokenizer, items: list[PromptItem], max_len: int | None = None) -> dict:
    """Rank each item's continuations by total and by mean log-likelihood; accuracy per category.

    Prompts start with the end-of-text token, as every training document does. An item counts as
    right when its correct continuation scores strictly higher than every incorrect one. `max_len`
    (a GPT's block size) keeps only the prompt's last tokens when prompt and continuation are longer.
    """
    rows = []
    for item in items:
        context = [tokenizer.eot_id, *tokenizer.encode(item.prompt)]
        conts = [tokenizer.encode(c) for c in item.candidates]
        if max_len is not None:
            context = context[max(0, len(context) + max(map(len, conts)) - max_len) :]
        logps = continuation_logprobs(model, context, conts)
        totals = [sum(lp) for lp in logps]
        means = [sum(lp) / len(lp) for lp in logps]
        rows.append(
            {
                "id": item.id,
                "category": item.category,
                "total_logprob": totals,
                "right_by_total": all(totals[0] > t for t in totals[1:]),
                "right_by_mean": all(means[0] > m for m in means[1:]),
            }
        )
    return {"items": rows, "summary": summarize_rows(rows, items)}


def summarize_rows(rows: list[dict], items: list[PromptItem]) -> dict:
    """Counts and accuracies per category and overall, with the accuracy of random guessing."""
    chance = {item.id: 1 / len(item.candidates) for item in items}
    summary = {}
    for name in (*CATEGORIES, "overall"):
        mine = [r for r in rows if name == "overall" or r["category"] == name]
        if not mine:
            continue
        right = sum(r["right_by_total"] for r in mine)
        summary[name] = {
            "n": len(mine),
            "right": right,
            "accuracy": right / len(mine),
            "accuracy_by_mean": sum(r["right_by_mean"] for r in mine) / len(mine),
            "chance": sum(chance[r["id"]] for r in mine) / len(mine),
        }
    return summary
