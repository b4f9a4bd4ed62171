"""The inspection as plain JSON-ready data: tokens, predictions, head parameters and retrievals.

Layout (lists are indexed by position, layer and head, in that order):

    tokens       [{position, id, text}]
    predictions  [{position, top: [{id, text, prob}], next_id, next_prob}]   next: the token that follows
    heads        [{layer, context: [params per head], persistent: [params per head] | null}]
    retrievals   [position][layer] = {context: [per head], persistent: [per head] | null}
                 context head:    {entries: [{position, weight, contribution}], output_norm, lookback,
                                   effective_entries}
                 persistent head: {slots: [{table, slot, weight, contribution}], output_norm}
    slot_usage   [layer][head] = [{table, slot, weight}]: slots with the largest weight summed over positions
    check        {max_abs_error}: rebuilt memory outputs against the model's own (see retrieval.py)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from memory_mosaics.inspect.retrieval import HeadParameters, Inspection, PersistentInspection

FORMAT = "mosaic-inspect/1"
PREDICTION_TOP = 5
DIGITS = 6

DEFINITIONS = {
    "weight": "retrieval weight: softmax over stored entries s <= t - shift of <k_t, k_s> (context), "
    "or over every slot of every table of <q_t, M_k> divided by the number of tables (persistent)",
    "contribution": "weight * |W_o^(h) value|: the norm of the vector the entry adds to the residual stream "
    "through the head's slice W_o^(h) of c_proj (bias excluded)",
    "output_norm": "|W_o^(h) r_t|: the norm of the head's whole output at this position "
    "(at most the sum of the contributions)",
    "lookback": "mean distance t - s of the retrieved entries under the weights",
    "effective_entries": "exp(entropy of the weights): how many entries the retrieval is spread over",
    "decay": "beta_h = 10 |theta_h|; the leaky key average keeps exp(-beta_h) of its previous value per step",
    "half_life": "ln 2 / beta_h: steps after which a past input's weight in the key has halved",
    "key_scale": "s_h^p, the factor on the unit-norm key (p = 1 context, 2 persistent)",
    "bandwidth": "1 / key_scale: width of the Gaussian kernel exp(-|k_t - k_s|^2 / (2 bandwidth^2)) on unit keys",
    "value_scale": "exp(10 gamma_h): the norm of a context value, or the persistent memory's output scale",
    "entry position s": "the entry stores key k_s (a summary of tokens <= s) and a value that looks "
    "shift steps ahead, at token s + shift: retrieving it recalls what followed position s",
}


def _round(value: float) -> float | None:
    """JSON has no inf or NaN: those become null."""
    value = float(value)
    return round(value, DIGITS) if math.isfinite(value) else None


def head_parameters(params: HeadParameters) -> list[dict[str, Any]]:
    fields = ("decay", "retention", "half_life", "key_scale", "bandwidth", "value_scale")
    n_head = params.decay.shape[0]
    return [{"head": h, **{name: _round(getattr(params, name)[h]) for name in fields}} for h in range(n_head)]


def _slot(persistent: PersistentInspection, flat_index: int) -> tuple[int, int]:
    return divmod(int(flat_index), persistent.size)


def build_report(inspection: Inspection, describe: Callable[[int], str], meta: dict[str, Any]) -> dict[str, Any]:
    """The whole inspection as a dict; `describe` shows a token id as text, `meta` is copied in."""
    ids = inspection.ids
    length = len(ids)
    return {
        "format": FORMAT,
        **meta,
        "shift": inspection.shift,
        "definitions": DEFINITIONS,
        "tokens": [{"position": t, "id": ids[t], "text": describe(ids[t])} for t in range(length)],
        "predictions": _predictions(inspection, describe),
        "heads": [
            {
                "layer": layer,
                "context": head_parameters(item.context.params),
                "persistent": head_parameters(item.persistent.params) if item.persistent else None,
            }
            for layer, item in enumerate(inspection.layers)
        ],
        "retrievals": [[_layer_at(item, t) for item in inspection.layers] for t in range(length)],
        "slot_usage": [_slot_usage(item.persistent) if item.persistent else None for item in inspection.layers],
        "check": {"max_abs_error": inspection.max_error},
    }


def _predictions(inspection: Inspection, describe: Callable[[int], str]) -> list[dict[str, Any]]:
    probs = torch.softmax(inspection.logits.double(), dim=-1)
    top_prob, top_id = probs.topk(min(PREDICTION_TOP, probs.shape[-1]), dim=-1)
    rows = []
    for t in range(len(inspection.ids)):
        following = inspection.ids[t + 1] if t + 1 < len(inspection.ids) else None
        top = [
            {"id": int(i), "text": describe(int(i)), "prob": _round(p)}
            for i, p in zip(top_id[t].tolist(), top_prob[t].tolist(), strict=True)
        ]
        rows.append(
            {
                "position": t,
                "top": top,
                "next_id": following,
                "next_prob": _round(probs[t, following]) if following is not None else None,
            }
        )
    return rows


def _layer_at(item, t: int) -> dict[str, Any]:
    context = item.context
    n_head = context.top.index.shape[0]
    context_heads = []
    for h in range(n_head):
        entries = [
            {"position": int(s), "weight": _round(w), "contribution": _round(c)}
            for s, w, c in zip(
                context.top.index[h, t].tolist(),
                context.top.weight[h, t].tolist(),
                context.top.contribution[h, t].tolist(),
                strict=True,
            )
            if s >= 0
        ]
        context_heads.append(
            {
                "head": h,
                "entries": entries,
                "output_norm": _round(context.output_norm[h, t]),
                "lookback": _round(context.lookback[h, t]),
                "effective_entries": _round(context.effective_entries[h, t]),
            }
        )
    persistent_heads = None
    if item.persistent is not None:
        persistent = item.persistent
        persistent_heads = []
        for h in range(n_head):
            slots = []
            for flat, w, c in zip(
                persistent.top.index[h, t].tolist(),
                persistent.top.weight[h, t].tolist(),
                persistent.top.contribution[h, t].tolist(),
                strict=True,
            ):
                table, slot = _slot(persistent, flat)
                slots.append({"table": table, "slot": slot, "weight": _round(w), "contribution": _round(c)})
            persistent_heads.append({"head": h, "slots": slots, "output_norm": _round(persistent.output_norm[h, t])})
    return {"context": context_heads, "persistent": persistent_heads}


def _slot_usage(persistent: PersistentInspection, top: int = PREDICTION_TOP) -> list[list[dict[str, Any]]]:
    usage = persistent.slot_usage
    weight, index = usage.topk(min(top, usage.shape[-1]), dim=-1)
    return [
        [
            {"table": _slot(persistent, i)[0], "slot": _slot(persistent, i)[1], "weight": _round(w)}
            for i, w in zip(index[h].tolist(), weight[h].tolist(), strict=True)
        ]
        for h in range(usage.shape[0])
    ]
