"""The paper's three-moons claim, checked on a quick run (150 steps of 8 windows of 300 steps, seed 100).

Claim (paper section 3): three heads disentangle the moons, one per head, and predict well once the
context covers each moon's own period; a single head needs the joint period. Measured here, with the
authors' optimizer (AdamW without bias correction) and free-running 25-step continuations on the
held-out triple: three heads score higher and their error falls once the context spans the longest
moon period, while one head's does not fall there. Seeds 100, 101 and 102 all pass these tests
(docs/moons.md lists the numbers). What we do not observe, and mark xfail with the measured numbers
rather than loosen: the single head's error falling after the joint period, and three heads beating
one head in absolute error between the two periods on this short recipe. The full 500-step recipe
shows both (docs/moons.md, Results): the single head needs 64 windows of 800 steps to learn the lookup.
"""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.tasks.moons.analysis import disentanglement, error_bands, error_vs_context
from memory_mosaics.tasks.moons.data import ThreeMoons
from memory_mosaics.tasks.moons.model import MoonsModelConfig
from memory_mosaics.tasks.moons.train import MoonsTrainConfig, train_moons

pytestmark = pytest.mark.slow

QUICK_TRAIN = MoonsTrainConfig(steps=150, batch_size=8, seq_len=300, seed=100)


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
    torch.set_flush_denormal(True)  # sharp softmaxes underflow; denormal arithmetic doubles the run time
    try:
        for n_head, head_dim in [(1, 6), (3, 2)]:
            model, losses = train_moons(MoonsModelConfig(n_head, head_dim), QUICK_TRAIN, data)
            curve = error_vs_context(model, x, y, lengths, num_predictions=25).tolist()
            runs[n_head] = {
                "losses": losses,
                "score": disentanglement(model)["score"],
                "bands": error_bands(lengths, curve, periods, joint, margin=5),
            }
    finally:
        torch.set_flush_denormal(False)
    return runs


def test_quick_training_learns(quick_runs):
    for run in quick_runs.values():
        assert sum(run["losses"][-10:]) < 0.5 * sum(run["losses"][:10])


def test_three_heads_score_higher_on_disentanglement(quick_runs):
    # seeds 100/101/102: 3 heads 0.72/0.54/1.00, 1 head 0.14/0.06/0.10
    assert quick_runs[3]["score"] > quick_runs[1]["score"] + 0.1, (quick_runs[3]["score"], quick_runs[1]["score"])


def test_three_heads_predict_better_once_each_moons_period_is_covered(quick_runs):
    """Error with the context between the longest moon period and the joint period, over the error before.

    seeds 100/101/102: 3 heads 0.69/0.80/0.40, 1 head 0.96/0.99/0.98.
    """
    three, one = quick_runs[3]["bands"], quick_runs[1]["bands"]
    assert three["longest_to_joint_period"] < 0.85 * three["before_longest_period"], three
    # A single memory cannot use each moon's own period: no comparable drop before the joint period.
    assert one["longest_to_joint_period"] > 0.9 * one["before_longest_period"], one


@pytest.mark.xfail(
    reason=(
        "not observed on the quick recipe (the full run shows it): the single head does not learn to look up "
        "the joint configuration; its free-running "
        "error after the joint period is 0.62/0.66/0.63 (seeds 100/101/102) against 0.26/0.28/0.36 between "
        "the periods, and it is below the 3-head error there (0.32/0.47/0.21) for seeds 100 and 101. "
        "See docs/moons.md."
    ),
    strict=False,
)
def test_one_head_needs_the_joint_period_and_three_heads_beat_it_before(quick_runs):
    one, three = quick_runs[1]["bands"], quick_runs[3]["bands"]
    assert one["after_joint_period"] < 0.5 * one["longest_to_joint_period"]
    assert three["longest_to_joint_period"] < 0.5 * one["longest_to_joint_period"]
