"""The paper's three-moons claim, checked on a quick run (200 steps of 8 windows of 400 steps).

Claim (paper section 3): three heads disentangle the moons, one per head, and predict well once the
context covers each moon's own period; a single head needs the joint period. The disentanglement
comparison holds in our measurements; the error-curve part does not (see docs/moons.md), so that
test is marked xfail with the numbers we measured rather than loosened until it passes.
"""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.tasks.moons.analysis import disentanglement, error_bands, error_vs_context
from memory_mosaics.tasks.moons.data import ThreeMoons
from memory_mosaics.tasks.moons.model import MoonsModelConfig
from memory_mosaics.tasks.moons.train import MoonsTrainConfig, train_moons

pytestmark = pytest.mark.slow

QUICK_TRAIN = MoonsTrainConfig(steps=200, batch_size=8, seq_len=400, seed=100)


@pytest.fixture(scope="module")
def quick_runs() -> dict:
    """Both networks trained on the quick recipe, with their held-out error bands (free-running, 25 steps)."""
    data = ThreeMoons()
    generator = torch.Generator().manual_seed(1000)
    starts = torch.randint(data.config.num_points - 2 * data.config.block_size - 1, (64,), generator=generator)
    x, y = data.windows(data.val_triple, starts, QUICK_TRAIN.seq_len)
    periods, joint = data.period_tokens(data.val_triple)
    lengths = list(range(1, QUICK_TRAIN.seq_len - 25 + 2, 5))
    runs = {}
    for n_head, head_dim in [(1, 6), (3, 2)]:
        model, losses = train_moons(MoonsModelConfig(n_head, head_dim), QUICK_TRAIN, data)
        curve = error_vs_context(model, x, y, lengths, num_predictions=25).tolist()
        runs[n_head] = {
            "losses": losses,
            "score": disentanglement(model)["score"],
            "bands": error_bands(lengths, curve, periods, joint, margin=5),
        }
    return runs


def test_quick_training_learns(quick_runs):
    for run in quick_runs.values():
        assert sum(run["losses"][-10:]) < 0.5 * sum(run["losses"][:10])


def test_three_heads_score_higher_on_disentanglement(quick_runs):
    assert quick_runs[3]["score"] > quick_runs[1]["score"] + 0.1, (quick_runs[3]["score"], quick_runs[1]["score"])


@pytest.mark.xfail(
    reason=(
        "not observed: quick run (seed 100) free-running error, held-out triple, L in (longest period, "
        "joint period]: 1 head 0.51, 3 heads 0.64; full 500-step run: 1 head 0.64, 3 heads 2.3 "
        "(3-head generation diverges at short contexts). See docs/moons.md."
    ),
    strict=False,
)
def test_three_heads_predict_before_the_joint_period_one_head_after(quick_runs):
    one, three = quick_runs[1]["bands"], quick_runs[3]["bands"]
    # A single memory only finds the current configuration again after the joint period ...
    assert one["after_joint_period"] < 0.5 * one["longest_to_joint_period"]
    # ... three disentangled memories already once each moon's own period is covered.
    assert three["longest_to_joint_period"] < 0.5 * one["longest_to_joint_period"]
