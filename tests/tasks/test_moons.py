"""Three moons: the generator, the complex memory, its cache, the error curve and the score."""

from __future__ import annotations

import math

import pytest
import torch

from memory_mosaics.errors import ConfigError
from memory_mosaics.tasks.moons.analysis import (
    disentanglement,
    error_bands,
    error_vs_context,
    hand_set_memory,
    retrieval_phase_match,
)
from memory_mosaics.tasks.moons.data import MoonsDataConfig, ThreeMoons, joint_period, select_triples
from memory_mosaics.tasks.moons.model import (
    MoonsMemory,
    MoonsModelConfig,
    clipped_mse,
    complex_projection,
    generate,
)
from memory_mosaics.tasks.moons.train import AdamWithoutBiasCorrection, MoonsTrainConfig, learning_rate


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Like torch.testing.assert_close, without its slow first import (~10 s on a busy machine)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    worst = ((actual - expected).abs() - rtol * expected.abs()).max().item()
    assert worst <= atol, f"max excess difference {worst:.3g} > atol {atol:g}"


@pytest.fixture(scope="module")
def moons() -> ThreeMoons:
    return ThreeMoons()


# --- data -----------------------------------------------------------------------------------------


def test_joint_period_is_lcm_at_tenth_precision():
    assert joint_period((0.5, 1.0, 2.0)) == pytest.approx(2.0)
    assert joint_period((1.0, 1.5, 2.0)) == pytest.approx(6.0)
    assert joint_period((0.5, 1.0, 2.5)) == pytest.approx(5.0)
    assert joint_period((1.5, 2.5, 3.5)) == pytest.approx(52.5)


def test_triple_selection_is_the_documented_one():
    train, held_out = select_triples()
    assert train == [
        (0.5, 1.0, 2.0),
        (0.5, 1.0, 1.5),
        (0.5, 1.0, 3.0),
        (0.5, 1.5, 3.0),
        (1.0, 1.5, 3.0),
        (0.5, 1.0, 2.5),
        (0.5, 1.5, 2.0),
        (0.5, 2.0, 3.0),
    ]
    assert held_out == (1.0, 1.5, 2.0)
    assert max(joint_period(t) for t in train) <= joint_period(held_out)


def test_time_grid_fits_longest_joint_period_three_times(moons):
    assert moons.tokens_per_unit == pytest.approx(800 / 6 / 3)
    periods, joint = moons.period_tokens(moons.val_triple)
    assert periods == pytest.approx([44.444, 66.667, 88.889], abs=1e-3)
    assert joint == pytest.approx(800 / 3)


def test_series_has_each_moons_period_and_unit_pairs(moons):
    triple = (0.5, 1.0, 2.5)
    series = moons.series(triple)
    assert series.shape == (10_000, 6)
    norms = series.reshape(-1, 3, 2).norm(dim=-1)
    assert_close(norms, torch.ones_like(norms))
    angle0 = torch.atan2(series[0, 0], series[0, 1])
    assert angle0.item() == pytest.approx(0.3, abs=1e-6)  # phase offset, sin first
    # 0.5 time units = 22.22 tokens: after 200 tokens (9 periods) moon 1 is back where it was.
    assert series[200, :2].tolist() == pytest.approx(series[0, :2].tolist(), abs=1e-5)
    # After the joint period (5 units = 222.2 tokens, not an integer) all moons are nearly back.
    shift = 5 * moons.tokens_per_unit
    assert (series[2000] - series[2000 + round(shift)]).abs().max() < 2 * math.pi / 22 * 0.5


def test_sample_shapes_shift_and_splits(moons):
    gen = torch.Generator().manual_seed(0)
    x, y = moons.sample(8, 50, gen, split="train")
    assert x.shape == y.shape == (8, 50, 6)
    assert_close(x[:, 1:], y[:, :-1])
    xv, _ = moons.sample(4, 50, gen, split="val")
    all_windows = moons.series(moons.val_triple).unfold(0, 50, 1).transpose(1, 2)  # (N-49, 50, 6)
    for row in xv:  # every validation window is a stretch of the held-out series
        assert (all_windows - row).abs().amax(dim=(1, 2)).min() < 1e-6
    train_windows = moons.series(moons.train_triples[0]).unfold(0, 50, 1).transpose(1, 2)
    assert (train_windows - xv[0]).abs().amax(dim=(1, 2)).min() > 0.1
    with pytest.raises(ConfigError):
        moons.sample(2, 801, gen)
    with pytest.raises(ConfigError):
        MoonsDataConfig(num_points=100)


# --- model ----------------------------------------------------------------------------------------


def test_complex_projection_is_idempotent_and_gives_rotation_scalings():
    w = torch.randn(6, 4)
    p = complex_projection(w)
    assert_close(complex_projection(p), p)
    block = p[2:4, 0:2]
    assert block[0, 0] == block[1, 1] and block[0, 1] == -block[1, 0]
    assert block[0, 0].item() == pytest.approx(((w[2, 0] + w[3, 1]) / 2).item())
    assert block[0, 1].item() == pytest.approx(((w[2, 1] - w[3, 0]) / 2).item())


@pytest.mark.parametrize("n_head,head_dim", [(1, 6), (3, 2)])
def test_fast_forward_matches_explicit_attention_outputs_and_gradients(n_head, head_dim):
    torch.manual_seed(0)
    model = MoonsMemory(MoonsModelConfig(n_head, head_dim)).double()
    x = torch.randn(3, 37, 6, dtype=torch.float64) * 0.3
    y = torch.randn(3, 37, 6, dtype=torch.float64) * 0.3
    fast, loss_fast = model(x, y)
    grads_fast = torch.autograd.grad(loss_fast, list(model.parameters()))
    plain, loss_plain = model(x, y, explicit=True)
    grads_plain = torch.autograd.grad(loss_plain, list(model.parameters()))
    assert_close(fast, plain)
    assert fast[:, 0].abs().max() == 0  # no past at position 0
    for a, b in zip(grads_fast, grads_plain, strict=True):
        assert_close(a, b)


def test_prediction_is_causal():
    torch.manual_seed(1)
    model = MoonsMemory(MoonsModelConfig(3, 2))
    x = torch.randn(2, 20, 6)
    before, _ = model(x)
    x2 = x.clone()
    x2[:, 12:] = torch.randn(2, 8, 6)
    after, _ = model(x2)
    # y_t = x_{t+1} may depend on x_0..x_t only, so predictions 0..11 are unchanged.
    assert_close(before[:, :12], after[:, :12])
    assert (before[:, 12] - after[:, 12]).abs().max() > 1e-4


def test_attention_rows_sum_to_one_over_strict_past():
    torch.manual_seed(2)
    model = MoonsMemory(MoonsModelConfig(3, 2))
    weights = model.attention(torch.randn(2, 15, 6))
    assert weights[..., 0, :].abs().max() == 0
    assert_close(weights[..., 1:, :].sum(-1), torch.ones(2, 3, 14))
    assert torch.triu(weights).abs().max() == 0  # diagonal and future excluded


@pytest.mark.parametrize("n_head,head_dim", [(1, 6), (3, 2)])
def test_step_by_step_teacher_forcing_equals_full_forward(n_head, head_dim, moons):
    torch.manual_seed(3)
    model = MoonsMemory(MoonsModelConfig(n_head, head_dim))
    x, _ = moons.sample(3, 70, torch.Generator().manual_seed(3))
    full, _ = model(x)
    cache = model.init_cache(3, 70)
    stepped = torch.stack([model.step(x[:, t], cache) for t in range(70)], dim=1)
    assert_close(stepped, full, rtol=1e-4, atol=1e-5)


def test_generation_equals_forward_on_its_own_fed_back_sequence(moons):
    """The delayed value write: position t-1's value must hold the fed-back x_t, not zeros."""
    torch.manual_seed(4)
    model = MoonsMemory(MoonsModelConfig(3, 2))
    with torch.no_grad():  # make retrieval sharp so that a wrong cached value would show
        model.key.weight.mul_(3)
    x, _ = moons.sample(2, 60, torch.Generator().manual_seed(4))
    generated = generate(model, x, num_predictions=30)
    fed_back = torch.cat([x, generated[:, :-1]], dim=1)  # x_0..x_59, then the predictions
    full, _ = model(fed_back)
    assert_close(generated, full[:, 59:], rtol=1e-4, atol=1e-5)


def test_clipped_mse_stops_at_half():
    pred = torch.tensor([0.0, 0.1, 3.0])
    target = torch.zeros(3)
    assert clipped_mse(pred, target).item() == pytest.approx((0.01 + 0.25) / 3)


def test_learning_rate_decays_linearly():
    config = MoonsTrainConfig()
    assert learning_rate(0, config) == pytest.approx(1e-2)
    assert learning_rate(250, config) == pytest.approx((1e-2 + 5e-6) / 2)
    assert learning_rate(500, config) == pytest.approx(5e-6)
    with pytest.raises(ConfigError):
        MoonsTrainConfig(steps=0)
    with pytest.raises(ConfigError):
        MoonsModelConfig(n_head=3, head_dim=3)


def test_default_optimizer_is_the_authors_adam_without_bias_correction():
    """MLX's AdamW (the authors' framework) omits bias correction: the first step is ~3.16 lr, not lr."""
    assert MoonsTrainConfig().bias_correction is False
    lr, eps, (b1, b2) = 0.1, 1e-8, (0.9, 0.999)
    param = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = AdamWithoutBiasCorrection([param], lr=lr, betas=(b1, b2), eps=eps)
    m = v = 0.0
    expected = 1.0
    for g in (0.5, -0.2, 0.3):
        param.grad = torch.tensor([g])
        optimizer.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected -= lr * m / (math.sqrt(v) + eps)
        assert param.item() == pytest.approx(expected, rel=1e-6)
    first_step = lr * (1 - b1) / math.sqrt(1 - b2)  # 0.316: what made MLX's steps larger than PyTorch's
    assert 1.0 - first_step == pytest.approx(0.68377, abs=1e-5)


# --- analysis -------------------------------------------------------------------------------------


def _periodic_copier(period: int, length: int) -> tuple[MoonsMemory, torch.Tensor, torch.Tensor]:
    """One moon with an integer period and a memory with identity maps and a near-hard-max kernel:
    its prediction is exact as soon as the context holds one earlier copy of the current phase."""
    model = MoonsMemory(MoonsModelConfig(n_head=1, head_dim=2, input_dim=2, attn_scale=1000.0))
    with torch.no_grad():
        for layer in (model.key, model.value, model.out):
            layer.weight.copy_(torch.eye(2))
    angles = 2 * math.pi * torch.arange(length + 1, dtype=torch.float32) / period + 0.3
    series = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1)[None]
    return model, series[:, :-1], series[:, 1:]


def test_error_vs_context_is_aligned_with_the_period():
    """Exact once the context holds x_{L-1-P} (L >= P+1), not before: no off-by-one either way."""
    period = 8
    model, x, y = _periodic_copier(period, 60)
    errors = error_vs_context(model, x, y, context_lengths=list(range(1, 30)), num_predictions=25)
    for length, err in zip(range(1, 30), errors.tolist(), strict=True):
        if length <= period:
            assert err > 0.01, (length, err)
        else:  # also exercises the delayed write: after P steps the copier reads generated values
            assert err < 1e-4, (length, err)


@pytest.mark.parametrize("write_values", [True, False])
def test_batched_error_curve_matches_stepping_the_cache(write_values, moons):
    torch.manual_seed(6)
    model = MoonsMemory(MoonsModelConfig(3, 2))
    with torch.no_grad():
        model.key.weight.mul_(3)
    x, y = moons.sample(3, 50, torch.Generator().manual_seed(6))
    lengths = [1, 2, 5, 17, 26, 30]
    # max_elements small enough to split the lengths into several chunks
    fast = error_vs_context(model, x, y, lengths, num_predictions=21, write_values=write_values, max_elements=400)
    plain = error_vs_context(model, x, y, lengths, num_predictions=21, write_values=write_values, stepwise=True)
    assert_close(fast, plain, rtol=1e-4, atol=1e-6)


def test_generation_without_value_writes_reproduces_the_authors_cache_bug():
    """Without the delayed write the copier reads zeros once it reaches generated positions."""
    model, x, y = _periodic_copier(8, 60)
    right = error_vs_context(model, x, y, context_lengths=[9, 20], num_predictions=25)
    buggy = error_vs_context(model, x, y, context_lengths=[9, 20], num_predictions=25, write_values=False)
    assert right.max() < 1e-4
    assert buggy.min() > 0.05


def test_error_vs_context_first_step_equals_teacher_forced_error(moons):
    torch.manual_seed(5)
    model = MoonsMemory(MoonsModelConfig(3, 2))
    x, y = moons.sample(4, 40, torch.Generator().manual_seed(5))
    errors = error_vs_context(model, x, y, context_lengths=[1, 7, 40], num_predictions=1)
    full, _ = model(x)
    expected = [(full[:, t] - y[:, t]).abs().mean().item() for t in (0, 6, 39)]
    assert errors.tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError):
        error_vs_context(model, x, y, context_lengths=[40], num_predictions=2)


def test_hand_set_memories_show_the_papers_error_curves(moons):
    """The measurement itself: a memory that works as the paper says gives the paper's curves.

    Three heads each keyed on one moon predict once the context spans the longest moon period; one
    head keyed on the whole sky needs the joint period. Free-running 25 steps, held-out triple.
    """
    starts = torch.randint(8000, (16,), generator=torch.Generator().manual_seed(7))
    x, y = moons.windows(moons.val_triple, starts, 330)
    periods, joint = moons.period_tokens(moons.val_triple)  # 44.4, 66.7, 88.9; 266.7
    lengths = list(range(1, 307, 3))
    bands = {}
    for n_head in (1, 3):
        curve = error_vs_context(hand_set_memory(n_head), x, y, lengths).tolist()
        bands[n_head] = error_bands(lengths, curve, periods, joint)
    assert bands[3]["before_longest_period"] > 0.4
    assert bands[3]["longest_to_joint_period"] < 0.15
    assert bands[1]["longest_to_joint_period"] > 0.5
    assert bands[1]["after_joint_period"] < 0.1
    assert disentanglement(hand_set_memory(3))["score"] == pytest.approx(1.0)


def _set_blocks(layer, moduli: torch.Tensor) -> None:
    """Give a complex layer real blocks with the given moduli (a = modulus, c = 0)."""
    with torch.no_grad():
        layer.weight.copy_(torch.kron(moduli.contiguous(), torch.eye(2)))


def test_disentanglement_is_one_for_block_diagonal_heads_and_zero_for_uniform():
    model = MoonsMemory(MoonsModelConfig(3, 2))
    permutation = torch.eye(3)[[2, 0, 1]]  # head h reads moon (h+2) % 3
    for layer in (model.key, model.value):
        _set_blocks(layer, permutation)
    _set_blocks(model.out, permutation.T)
    result = disentanglement(model)
    assert result["score"] == pytest.approx(1.0)
    assert result["head_moon"] == [2, 0, 1]

    for layer in (model.key, model.value, model.out):
        _set_blocks(layer, torch.ones(3, 3))
    assert disentanglement(model)["score"] == pytest.approx(0.0, abs=1e-6)

    single = MoonsMemory(MoonsModelConfig(1, 6))
    for layer in (single.key, single.value, single.out):
        _set_blocks(layer, torch.eye(3))  # one head touching all moons equally
    assert disentanglement(single)["score"] == pytest.approx(0.0, abs=1e-6)


def test_disentanglement_penalises_heads_that_all_track_the_same_moon():
    model = MoonsMemory(MoonsModelConfig(3, 2))
    same = torch.zeros(3, 3)
    same[:, 0] = 1  # every head reads moon 1
    for layer in (model.key, model.value):
        _set_blocks(layer, same)
    _set_blocks(model.out, same.T)
    score = disentanglement(model)["score"]
    assert score == pytest.approx(0.0, abs=1e-6)  # (3 * 1/3 - 1) / 2: only one head can own moon 1


def test_disentanglement_score_in_unit_interval_for_random_models():
    for seed in range(5):
        torch.manual_seed(seed)
        for n_head, head_dim in [(1, 6), (3, 2)]:
            score = disentanglement(MoonsMemory(MoonsModelConfig(n_head, head_dim)))["score"]
            assert 0.0 <= score <= 1.0


def test_retrieval_phase_match_is_one_for_a_perfect_copier():
    model, x, _ = _periodic_copier(8, 40)
    angles = 2 * math.pi * torch.arange(41, dtype=torch.float64) / 8 + 0.3
    match = retrieval_phase_match(model, x, angles[None, :, None], first_position=9)
    assert match.shape == (1, 1)
    assert match.item() == pytest.approx(1.0, abs=1e-4)
    early = retrieval_phase_match(model, x[:, :8], angles[None, :9, None], first_position=1)
    assert early.item() < 0.95
