"""RegBench harness: schedule, registry models, a tiny end-to-end run, and the command."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from memory_mosaics.cli import main
from memory_mosaics.errors import ConfigError
from memory_mosaics.tasks.regbench import harness
from memory_mosaics.tasks.regbench.data import VOCAB_SIZE, RegBenchConfig, generate_regbench
from memory_mosaics.tasks.regbench.harness import TrainConfig, learning_rate, run_model
from memory_mosaics.tasks.regbench.models import MODELS, build_model, count_params, mosaic_param_count
from memory_mosaics.tasks.regbench.published import published

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "regbench_seed0.json"
# Tiny versions of every registered family, for speed.
TINY = {
    "mosaic": dict(n_layer=1, n_head=2, n_embd=16, pmem_size=8),
    "transformer": dict(n_layer=1, n_head=2, n_embd=16),
}
TINY_BASELINE = dict(n_layer=1, n_embd=16)


def tiny(name: str) -> dict:
    return TINY.get(name, TINY_BASELINE)


@pytest.fixture(scope="module")
def splits():
    return generate_regbench(RegBenchConfig(num_train=10, num_test=8, seed=1))


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    config = TrainConfig(steps=100, lr=1e-3)
    lrs = [learning_rate(step, 100, config) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 5 / 10)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert learning_rate(100, 100, config) == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 45 / 90)))


def test_budget_in_epochs_or_steps():
    assert TrainConfig(epochs=3, batch_size=32).total_steps(100) == 12
    assert TrainConfig(epochs=3, steps=7).total_steps(100) == 7
    with pytest.raises(ConfigError, match="warmup_frac"):
        TrainConfig(warmup_frac=1.0)


def test_full_size_models_have_matched_parameter_counts():
    target = mosaic_param_count()
    assert target == count_params(build_model("mosaic", 64))
    for name in MODELS:
        params = count_params(build_model(name, 64))
        assert abs(params - target) / target < 0.05, (name, params, target)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_is_causal_and_trains(name):
    torch.manual_seed(0)
    model = build_model(name, 32, dropout=0.0, **tiny(name))
    idx = torch.randint(0, VOCAB_SIZE, (2, 12))
    logits, _ = model(idx)
    assert logits.shape == (2, 12, VOCAB_SIZE)
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % VOCAB_SIZE
    assert torch.allclose(model(changed)[0][:, :8], logits[:, :8], atol=1e-5)
    assert not torch.allclose(model(changed)[0][:, 8:], logits[:, 8:], atol=1e-5)
    logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_end_to_end_keeps_the_best_val_checkpoint(splits, monkeypatch):
    val_losses = []
    evaluate = harness.evaluate

    def recording_evaluate(model, prompts, config, device, masks=None):
        loss, sums = evaluate(model, prompts, config, device, masks)
        if prompts is splits.val:
            val_losses.append(loss)
        return loss, sums

    monkeypatch.setattr(harness, "evaluate", recording_evaluate)
    config = TrainConfig(steps=6, batch_size=4, lr=1e-2, num_evals=3, max_len=24, dtype="float32")
    result = run_model("transformer", splits, config, **TINY["transformer"])
    assert result.steps == 6 and len(val_losses) == 3
    assert result.best_val_loss == min(val_losses)
    assert result.best_step == 2 * (1 + val_losses.index(min(val_losses)))
    assert 0.0 <= result.accuracy <= 1.0 and 0.0 <= result.tvd <= 2.0 and math.isfinite(result.test_loss)
    # Same seed, same run: the whole protocol is deterministic.
    again = run_model("transformer", splits, config, **TINY["transformer"])
    assert (again.accuracy, again.tvd, again.test_loss) == (result.accuracy, result.tvd, result.test_loss)


def test_command_writes_rows_and_figure(tmp_path, capsys):
    rows_path, png_path = tmp_path / "rows.json", tmp_path / "fig.png"
    args = "regbench --models transformer,mosaic --train-dfas 6 --num-test-dfas 4 --steps 2 --batch-size 3"
    args += " --max-len 16 --dtype float32"
    code = main([*args.split(), "--json", str(rows_path), "--png", str(png_path)])
    assert code == 0
    rows = json.loads(rows_path.read_text())
    assert [r["model"] for r in rows] == ["ngram-2", "ngram-3", "transformer", "mosaic"]
    for row in rows:
        assert {"model", "num_train_dfas", "seed", "accuracy", "tvd", "params"} <= set(row)
        assert row["num_train_dfas"] == 6 and row["seed"] == 0
    assert rows[2]["steps"] == 2 and rows[2]["params"] == count_params(build_model("transformer", 16))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "published acc" in capsys.readouterr().out


def test_command_rejects_an_unknown_model(capsys):
    assert main(["regbench", "--models", "nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err


def test_published_numbers_lookup():
    assert published("mosaic", 100) == (0.925, 0.569)
    assert published("transformer", 2500) == (0.925, 0.232)
    assert published("gru", 100) is None and published("mosaic", 777) is None


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"benchmark reference data not found at {REFERENCE}")
def test_command_trains_on_the_benchmarks_own_data(tmp_path):
    rows_path = tmp_path / "rows.json"
    args = f"regbench --reference-data {REFERENCE} --models transformer --train-dfas 5 --steps 1 --batch-size 5"
    args += " --max-len 12 --num-evals 1 --ngram 2"
    assert main([*args.split(), "--json", str(rows_path)]) == 0
    rows = json.loads(rows_path.read_text())
    assert [(r["model"], r["num_train_dfas"]) for r in rows] == [("ngram-2", 5), ("transformer", 5)]
    assert rows[1]["settings"]["reference_data"] == str(REFERENCE)
