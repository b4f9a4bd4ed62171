"""What the moons networks learned: error against context length, and a disentanglement score.

Disentanglement score (also in docs/moons.md)
--------------------------------------------
Every map of the network is a complex matrix whose entries connect one complex coordinate (a
(sin, cos) pair) to another. The inputs and outputs are the three moons, so for head h we can ask
how the energy |w|^2 of each of its maps is spread over the moons:

    key_h(j)   = sum over the head's key coordinates i of |W_phi[i, j]|^2, normalised to sum 1 over j
    value_h(j) = the same for W_psi (what the head stores)
    out_h(j)   = sum over the head's coordinates i of |W_z[j, i]|^2, normalised (where it writes)
    p_h(j)     = (key_h(j) + value_h(j) + out_h(j)) / 3

p_h is the head's moon profile. The heads are then matched to distinct moons (the best one-to-one
assignment sigma; a single head simply takes its best moon), A = mean_h p_h(sigma(h)), and

    disentanglement = (n_moons * A - 1) / (n_moons - 1)   in [0, 1]

A is at least 1/n_moons (the average over assignments is exactly 1/n_moons), so the score is 0
when every head spreads evenly over the moons and 1 when every head reads, stores and writes one
moon only, each head a different moon.

Why it measures *predictive* disentanglement: a head's attention depends on its keys only. If
the key map reads moon j alone, the head retrieves past steps where moon j stood where it stands
now, whatever the other moons did — exactly what is needed to predict moon j, and available as
soon as the context spans moon j's own period. If its values and outputs are moon j too, the head
predicts moon j and nothing else, so the prediction task is split into independent per-moon
memories. A head that mixes moons can only find an exact match where the *joint* configuration
repeats, which takes the joint period. The assignment is one-to-one so that three heads all
tracking the same moon (which would leave two moons unpredicted) do not score high.
"""

from __future__ import annotations

import itertools

import torch

from memory_mosaics.errors import ConfigError
from memory_mosaics.tasks.moons.model import MoonsCache, MoonsMemory, MoonsModelConfig


@torch.no_grad()
def error_vs_context(
    model: MoonsMemory,
    x: torch.Tensor,
    y: torch.Tensor,
    context_lengths: list[int],
    num_predictions: int = 25,
    write_values: bool = True,
    stepwise: bool = False,
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """Mean |prediction - truth| of a free-running continuation, for each context length.

    For context length L the model sees x_0..x_{L-1}, predicts y_{L-1} (= x_L), feeds that back,
    and so on for `num_predictions` steps; prediction j is compared with y_{L-1+j}. The error is
    averaged over the steps, the windows and the 6 coordinates. x, y: (B, T, 6) with y = next x.
    `write_values=False` generates the authors' way, never storing the values of the last prompt
    position and of the generated ones (their cache bug), for comparison only.

    By default all context lengths of a chunk run at once (attention logits of at most `max_elements`
    entries); `stepwise=True` is the plain twin that steps the model's own cache, one length at a time.
    """
    if min(context_lengths) < 1 or max(context_lengths) + num_predictions - 1 > x.shape[1]:
        raise ConfigError(
            f"context lengths must be in [1, {x.shape[1] - num_predictions + 1}] for windows of "
            f"{x.shape[1]} steps and {num_predictions} predictions"
        )
    teacher_forced, _ = model(x)  # causal: position L-1 only saw x_0..x_{L-1}
    keys, values = model.keys_and_values(x)
    if stepwise:
        return torch.stack(
            [
                _free_run_stepwise(model, teacher_forced, keys, values, y, length, num_predictions, write_values)
                for length in context_lengths
            ]
        )
    per_length = keys.shape[0] * keys.shape[1] * max(context_lengths)
    chunk = max(1, max_elements // per_length)
    errors = [
        _free_run_chunk(model, teacher_forced, keys, values, y, part, num_predictions, write_values)
        for part in torch.tensor(context_lengths).split(chunk)
    ]
    return torch.cat(errors)


def _free_run_stepwise(model, teacher_forced, keys, values, y, length, num_predictions, write_values):
    """The error of the free-running continuation from one context length, through `model.step`."""
    cache = MoonsCache.from_prefix(keys, values, length, capacity=length + num_predictions - 1)
    predictions = [teacher_forced[:, length - 1]]
    for _ in range(num_predictions - 1):
        predictions.append(model.step(predictions[-1], cache, write_value=write_values))
    truth = y[:, length - 1 : length - 1 + num_predictions]
    return (torch.stack(predictions, dim=1) - truth).abs().mean()


def _free_run_chunk(model, teacher_forced, keys, values, y, lengths, num_predictions, write_values):
    """Errors of the free-running continuations from the context lengths `lengths` (nL,), side by side.

    Memory entries of a run from length L: the prompt's positions 0..L-2 (true keys and values), then
    "extra" entries for positions L-1, L, ...: the key of L-1 is known, the others come from the fed-back
    predictions, and every extra value is written one step late, when the next input is known.
    """
    scale = model.config.attn_scale
    span = int(lengths.max()) - 1
    prompt_keys, prompt_values = keys[:, :, :span], values[:, :, :span]  # (B, H, S, d)
    hidden = torch.arange(span)[None, :] >= (lengths[:, None] - 1)  # (nL, S): not in this run's prompt
    prompt_bias = torch.zeros(hidden.shape, dtype=keys.dtype).masked_fill(hidden, float("-inf"))
    extra_keys = [keys[:, :, lengths - 1]]  # (B, H, nL, d)
    extra_values = []
    predictions = [teacher_forced[:, lengths - 1]]  # (B, nL, 6)
    for _ in range(num_predictions - 1):
        fed_back = predictions[-1]
        value = model._split_heads(model.value(fed_back))  # the delayed write of the previous position
        extra_values.append(value if write_values else torch.zeros_like(value))
        query = model._split_heads(model.key(fed_back))  # (B, H, nL, d)
        prompt_logits = scale * query @ prompt_keys.transpose(-1, -2) + prompt_bias  # (B, H, nL, S)
        extra_logits = scale * (torch.stack(extra_keys, dim=3) @ query[..., None]).squeeze(-1)  # (B,H,nL,j)
        weights = torch.softmax(torch.cat([prompt_logits, extra_logits], dim=-1), dim=-1)
        mixed = weights[..., :span] @ prompt_values
        mixed = mixed + (weights[..., span:, None] * torch.stack(extra_values, dim=3)).sum(dim=3)
        predictions.append(model.out(model._merge_heads(mixed)))
        extra_keys.append(query)
    predictions = torch.stack(predictions, dim=2)  # (B, nL, n, 6)
    truth = y[:, (lengths - 1)[:, None] + torch.arange(num_predictions)]  # y_{L-1+j}
    return (predictions - truth).abs().mean(dim=(0, 2, 3))


def error_bands(
    context_lengths: list[int], curve: list[float], periods: list[float], joint: float, margin: int = 5
) -> dict[str, float | None]:
    """Mean error over three ranges of context length L (periods in tokens).

    before_longest_period: L <= the longest moon period (some moon has not come round yet);
    longest_to_joint_period: longest + margin <= L <= joint (each moon has, the joint sky has not);
    after_joint_period: L >= joint + margin. A range without any measured L gives None.
    """
    longest = max(periods)
    bands = {
        "before_longest_period": lambda n: n <= longest,
        "longest_to_joint_period": lambda n: longest + margin <= n <= joint,
        "after_joint_period": lambda n: n >= joint + margin,
    }
    means = {}
    for name, inside in bands.items():
        values = [e for n, e in zip(context_lengths, curve, strict=True) if inside(n)]
        means[name] = sum(values) / len(values) if values else None
    return means


@torch.no_grad()
def one_step_error_vs_context(model: MoonsMemory, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean |prediction - truth| of the teacher-forced prediction of y_{L-1}, for L = 1..T.

    Entry L-1 is the error of the first step of `error_vs_context` at context length L: nothing is fed
    back, so this curve shows what the memory can retrieve, without compounding errors.
    """
    pred, _ = model(x)
    return (pred - y).abs().mean(dim=(0, 2))


def hand_set_memory(n_head: int, key_scale: float = 2.0) -> MoonsMemory:
    """A memory whose maps are set by hand, not trained: keys `key_scale` * x, values x, outputs identity.

    With 3 heads each head reads, stores and writes one moon (disentanglement 1); with 1 head the key
    compares the whole sky. They show what the error curves look like when a memory works the way the
    paper describes: the 3-head one is exact once the context spans each moon's own period, the 1-head
    one only after the joint period (tests/tasks/test_moons.py, docs/moons.md).
    """
    if n_head not in (1, 3):
        raise ConfigError(f"hand_set_memory builds 1 or 3 heads for three moons, got {n_head}")
    model = MoonsMemory(MoonsModelConfig(n_head=n_head, head_dim=6 // n_head))
    with torch.no_grad():
        model.key.weight.copy_(key_scale * torch.eye(6))
        model.value.weight.copy_(torch.eye(6))
        model.out.weight.copy_(torch.eye(6))
    return model


def head_moon_profiles(model: MoonsMemory, n_moons: int = 3) -> dict[str, torch.Tensor]:
    """Per head, the share of each map's energy on each moon: tensors (H, n_moons) for key/value/out."""
    config = model.config
    if config.input_dim != 2 * n_moons:
        raise ConfigError(f"the model reads {config.input_dim} inputs, not the 2*{n_moons} of {n_moons} moons")
    pairs = config.head_dim // 2  # complex coordinates per head
    energy = {
        "key": model.key.block_moduli().square(),  # (H*pairs, n_moons)
        "value": model.value.block_moduli().square(),
        "out": model.out.block_moduli().square().T,  # (H*pairs, n_moons): head coordinate -> moon
    }
    profiles = {}
    for name, e in energy.items():
        per_head = e.reshape(config.n_head, pairs, n_moons).sum(dim=1)
        profiles[name] = per_head / per_head.sum(dim=1, keepdim=True)
    return profiles


def disentanglement(model: MoonsMemory, n_moons: int = 3) -> dict:
    """The disentanglement score (module doc) with the per-head profiles and the assignment."""
    with torch.no_grad():
        profiles = head_moon_profiles(model, n_moons)
        mean_profile = (profiles["key"] + profiles["value"] + profiles["out"]) / 3  # (H, n_moons)
    n_head = mean_profile.shape[0]
    if n_head <= n_moons:
        assignments = itertools.permutations(range(n_moons), n_head)
    else:  # more heads than moons: one-to-one is impossible, every head takes its best moon
        assignments = [tuple(mean_profile.argmax(dim=1).tolist())]
    best = max(assignments, key=lambda a: sum(mean_profile[h, j].item() for h, j in enumerate(a)))
    matched = sum(mean_profile[h, j].item() for h, j in enumerate(best)) / n_head
    return {
        "score": (n_moons * matched - 1) / (n_moons - 1),
        "head_moon": list(best),
        "profiles": {name: p.tolist() for name, p in profiles.items()},
    }


@torch.no_grad()
def retrieval_phase_match(
    model: MoonsMemory, x: torch.Tensor, phases: torch.Tensor, first_position: int = 1
) -> torch.Tensor:
    """How well each head's retrievals match each moon: a (H, n_moons) matrix in [-1, 1].

    phases: (B, T+1, n_moons) angle of each moon at x_0..x_T. Head h at query t retrieves the
    values v_s (= x_{s+1}) with weights a_ts; the entry for moon j is the attention-weighted mean of
    cos(angle_j(s+1) - angle_j(t+1)) over queries t >= first_position: 1 when the head always
    retrieves steps where moon j was exactly where it is about to be.
    """
    weights = model.attention(x)  # (B, H, T, T)
    t = x.shape[1]
    target = phases[:, 1 : t + 1].to(weights.dtype)  # angle at t+1 for query t, (B, T, n_moons)
    # cos(a - b) = cos a cos b + sin a sin b: avoids a (B, T, T, n_moons) tensor
    cos_t, sin_t = torch.cos(target), torch.sin(target)
    retrieved_cos = torch.einsum("bhts,bsj->bhtj", weights, cos_t)
    retrieved_sin = torch.einsum("bhts,bsj->bhtj", weights, sin_t)
    match = retrieved_cos * cos_t[:, None] + retrieved_sin * sin_t[:, None]  # (B, H, T, n_moons)
    return match[:, :, first_position:].mean(dim=(0, 2))
