"""The throughput benchmark's parts on tiny models: cells, FLOP counts, memory probe, report, CLI."""

from __future__ import annotations

import pytest
import torch

from memory_mosaics.bench.memory import measure_here, peak_memory
from memory_mosaics.bench.nanogpt import NanoGPT, NanoGPTConfig
from memory_mosaics.bench.report import markdown_table, plot_throughput
from memory_mosaics.bench.throughput import (
    ThroughputSettings,
    build_model,
    measure_cell,
    model_flops_per_token,
    ratio_interval,
    run_throughput,
)
from memory_mosaics.cli import main

TINY = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=64, batch_size=2, rounds=2, memory=False, peak_matrix_size=128)


def test_nanogpt_is_causal_and_trains():
    torch.manual_seed(0)
    model = NanoGPT(NanoGPTConfig(vocab_size=32, block_size=12, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 32, (2, 12))
    logits, loss = model(idx, idx)
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 32
    torch.testing.assert_close(model(changed)[0][:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[0][:, 7:], logits[:, 7:])
    loss.backward()
    assert model.wte.weight.grad.abs().sum() > 0
    assert model.num_params() == sum(p.numel() for p in model.parameters()) - 32 * 16 - 12 * 16


def test_flop_count_follows_nanogpt_formula_and_models_match_in_size():
    settings = ThroughputSettings(n_layer=2, n_embd=32, n_head=4, vocab_size=100)
    gpt, mosaic = build_model("gpt", settings, 64), build_model("mosaic", settings, 64)
    layer_weights = 2 * 12 * 32 * 32  # attention 4C^2 + MLP 8C^2 per layer
    assert model_flops_per_token(gpt, 64) == 6 * (layer_weights + 100 * 32) + 6 * 2 * 32 * 64
    # pmem_size = 3.5 C: the same weights per layer (the persistent tables count as weights).
    assert model_flops_per_token(mosaic, 64) == model_flops_per_token(gpt, 64)


def test_cell_measures_every_model_interleaved():
    settings = ThroughputSettings(**TINY, lengths=(8,))
    rows = measure_cell(settings, 8, "bfloat16")
    assert [r["model"] for r in rows] == ["mosaic", "gpt", "nanogpt"]
    for row in rows:
        assert len(row["all_seconds_per_step"]) == 2 and row["tokens_per_second"] > 0
        assert row["tokens_per_second"] == pytest.approx(16 / row["seconds_per_step"])


def test_each_timed_step_follows_a_step_of_the_same_model(monkeypatch):
    import memory_mosaics.bench.throughput as throughput

    calls = []
    real = throughput.training_step

    def recording(model, settings, length, dtype):
        step = real(model, settings, length, dtype)
        return lambda: calls.append(type(model).__name__) or step()

    monkeypatch.setattr(throughput, "training_step", recording)
    rows = measure_cell(ThroughputSettings(**TINY, lengths=(8,), models=("mosaic", "gpt")), 8, "float32")
    assert [len(r["all_seconds_per_step"]) for r in rows] == [2, 2]
    # one warm-up step each, then per round and model an untimed step and a timed one of that same model
    assert calls[:2] == ["MemoryMosaic", "GPT"] and len(calls) == 2 + 2 * 2 * 2
    pairs = [calls[i : i + 2] for i in range(2, len(calls), 2)]
    assert all(first == second for first, second in pairs) and {p[0] for p in pairs} == {"MemoryMosaic", "GPT"}


def test_run_reports_ratios_mfu_and_renders(tmp_path):
    result = run_throughput(ThroughputSettings(**TINY, lengths=(8,), dtypes=("float32",), models=("mosaic", "gpt")))
    (cell,) = result["cells"]
    by_model = {r["model"]: r for r in result["rows"]}
    ratio = by_model["mosaic"]["tokens_per_second"] / by_model["gpt"]["tokens_per_second"]
    assert cell["mosaic_over_gpt"] == pytest.approx(ratio)
    assert cell["gpt_over_nanogpt"] is None  # nanogpt not measured
    assert all(0 < r["mfu"] < 1 for r in result["rows"])
    assert result["machine"]["matmul_peak_flops"]["float32"] > 0
    low, high = cell["intervals"]["mosaic_over_gpt"]
    assert low <= cell["mosaic_over_gpt"] <= high
    assert cell["intervals"]["gpt_over_nanogpt"] is None
    assert f"| 8 | float32 | {by_model['mosaic']['tokens_per_second']:.0f} |" in markdown_table(result)
    assert f"{ratio:.2f} ({low:.2f}-{high:.2f})" in markdown_table(result)
    plot_throughput(result, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_ratio_interval_is_the_spread_of_resampled_median_ratios():
    # Twice as fast in every round: no spread at all.
    assert ratio_interval([1.0, 1.2, 0.9], [2.0, 2.4, 1.8]) == (2.0, 2.0)
    # The same noisy times for both: a ratio of 1 whatever the resample, as the rounds are resampled in pairs.
    noisy = [1.0, 1.5, 0.8, 1.1, 2.0]
    assert ratio_interval(noisy, noisy) == (1.0, 1.0)
    # Unpaired noise: an interval around the ratio of medians (1.0 here), seeded, narrower at lower confidence.
    numerator, denominator = [1.0, 1.3, 0.9, 1.1, 1.2, 1.0, 0.95], [1.1, 0.9, 1.25, 1.0, 1.05, 1.15, 1.0]
    low, high = ratio_interval(numerator, denominator)
    assert low < 1.0 < high and (low, high) == ratio_interval(numerator, denominator)
    narrow_low, narrow_high = ratio_interval(numerator, denominator, confidence=0.5)
    assert low <= narrow_low <= narrow_high <= high and (narrow_low, narrow_high) != (low, high)
    with pytest.raises(ValueError, match="one time per round"):
        ratio_interval([1.0], [1.0, 2.0])


def test_memory_probe_in_process_and_in_a_fresh_process():
    settings = ThroughputSettings(**TINY)
    here = measure_here(settings, "mosaic", 16, "float32", largest=True)
    assert here["largest_tensor_numel"] >= 2 * 16 * 64  # the logits at least
    assert here["peak_bytes"] >= here["before_step_bytes"] > 0
    probe = peak_memory(settings, "gpt", 16, "float32")
    assert probe["step_peak_bytes"] >= 0 and "VmHWM" in probe["memory_method"]


def test_cli_rejects_bad_input_and_writes_json(tmp_path, capsys):
    assert main(["bench", "--lengths", "abc"]) == 2
    assert main(["bench", "--dtypes", "float16"]) == 2
    assert main(["bench", "--models", "rnn"]) == 2
    assert main(["bench", "--batch-size", "0"]) == 2
    assert main(["bench", "--json", str(tmp_path / "missing" / "x.json")]) == 2
    assert "error" in capsys.readouterr().err
