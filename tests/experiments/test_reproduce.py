"""`mosaic reproduce` end to end at toy scale, and the pieces it folds its results with."""

import json
import math
from pathlib import Path

import pytest

from memory_mosaics.cli import main
from memory_mosaics.errors import ConfigError
from memory_mosaics.experiments.lm_depths import ReproduceConfig, claim_work_folder, plan_jobs
from memory_mosaics.experiments.ood import _prose_paragraphs, python_docs_documents
from memory_mosaics.experiments.summary import all_finite, bucket_means, mean_curve

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinystories"
needs_data = pytest.mark.skipif(not (DATA / "train.txt").is_file(), reason=f"TinyStories sample not at {DATA}")


@needs_data
def test_quick_reproduce_writes_a_complete_finite_report(tmp_path, capsys):
    out, docs = tmp_path / "work", tmp_path / "docs"
    docs.mkdir()
    args = ["reproduce", "--quick", "--data", str(DATA), "--out", str(out), "--json", str(docs / "results.json"),
            "--markdown", str(docs / "results.md"), "--figures", str(docs / "figures")]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((docs / "results.json").read_text())
    assert set(summary["depths"]) == {"1", "2"}
    assert summary["jobs"]["missing"] == []
    for entry in summary["depths"].values():
        for key in ("mosaic_val_loss", "gpt_val_loss", "mosaic_ood_loss", "gpt_ood_loss"):
            assert math.isfinite(entry[key]) and 0 < entry[key] < 20, key
        assert entry["mosaic_params"] > 0 and entry["gpt_params"] > 0
        # Same width and blocks: the non-embedding counts agree to within a few per cent.
        assert entry["mosaic_params_non_embedding"] == pytest.approx(entry["gpt_params_non_embedding"], rel=0.05)
    assert all_finite(summary)
    for split in ("val", "ood"):
        curve = summary["per_position"][split]["1"]["mosaic"]
        assert len(curve) == 128 and all(v is None or math.isfinite(v) for v in curve)
    suite = summary["prompt_suite"]["2"]["gpt"]
    assert {k: suite[k]["n"] for k in ("factual", "logical", "consistency", "overall")} == {
        "factual": 2, "logical": 2, "consistency": 2, "overall": 6
    }  # fmt: skip
    assert len(summary["samples"]["1"]["mosaic"]) == 3
    report = (docs / "results.md").read_text()
    assert "| depth | Memory Mosaic | GPT |" in report and "reading:start" in report
    assert sorted(p.name for p in (docs / "figures").iterdir()) == sorted(
        ["results_val_loss_by_depth.png", "results_loss_by_position.png", "results_position_gap.png",
         "results_training_curves.png", "results_prompt_suite.png"]
    )  # fmt: skip
    assert "depth 2: Memory Mosaic" in capsys.readouterr().out
    # --report-only rewrites the outputs from the finished jobs without training anything.
    (docs / "results.json").unlink()
    assert main([*args[:-2], "--figures", "", "--report-only", "--rescore-prompts"]) == 0
    again = json.loads((docs / "results.json").read_text())
    assert again["depths"] == summary["depths"] and "done " not in capsys.readouterr().out
    assert again["prompt_suite"] == summary["prompt_suite"]  # same models, same suite: same scores


def test_jobs_run_seed_by_seed_deepest_first():
    names = [job.name for job in plan_jobs(ReproduceConfig(depths=(1, 4), seeds=(7, 8)))]
    assert names == [
        "mosaic-d4-s7", "gpt-d4-s7", "mosaic-d1-s7", "gpt-d1-s7",
        "mosaic-d4-s8", "gpt-d4-s8", "mosaic-d1-s8", "gpt-d1-s8",
    ]  # fmt: skip


def test_a_work_folder_refuses_results_computed_with_other_settings(tmp_path):
    claim_work_folder(ReproduceConfig(out=str(tmp_path), max_steps=5))
    claim_work_folder(ReproduceConfig(out=str(tmp_path), max_steps=5, seeds=(1, 2, 3)))  # more seeds: fine
    with pytest.raises(ConfigError, match="max_steps"):
        claim_work_folder(ReproduceConfig(out=str(tmp_path), max_steps=6))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "{missing}"], "holds neither a prepared data set"),
        (["--data", str(DATA), "--ood", "{empty}"], "is empty"),
        (["--data", str(DATA), "--ood", "{missing}"], "does not exist"),
    ],
)
def test_bad_sources_are_refused_before_the_work_folder_is_made(tmp_path, capsys, flags, message):
    (tmp_path / "empty.txt").write_text("")
    paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty.txt")}
    argv = ["reproduce", "--quick", "--out", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")]
    argv += ["--markdown", str(tmp_path / "r.md"), "--figures", str(tmp_path / "fig")]
    assert main(argv + [flag.format(**paths) for flag in flags]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]  # nothing written


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="depths"):
        ReproduceConfig(depths=(0, 1))
    with pytest.raises(ConfigError, match="eval_dtype"):
        ReproduceConfig(eval_dtype="float16")


def test_curves_average_over_seeds_and_buckets_weigh_by_counts():
    assert mean_curve([[1.0, 2.0, None], [3.0, 4.0, 5.0]]) == [2.0, 3.0, None]
    losses = [1.0] * 16 + [2.0, 4.0] + [None] * 46
    counts = [10] * 16 + [3, 1] + [0] * 46
    buckets = bucket_means(losses, counts)
    assert buckets["0-15"] == 1.0
    assert buckets["16-63"] == pytest.approx((2.0 * 3 + 4.0 * 1) / 4)
    assert buckets["64-127"] is None and buckets["128-255"] is None


def test_python_docs_keep_prose_and_drop_code_and_titles():
    topic = (
        'The "if" statement\n******************\n\nThe "if" statement is used for conditional execution\n'
        'of a suite of statements in a program:\n\n   if_stmt ::= "if" expression ":" suite\n\n'
        "Short title line\n"
    )
    assert _prose_paragraphs(topic) == [
        'The "if" statement is used for conditional execution of a suite of statements in a program:'
    ]
    docs = python_docs_documents()
    assert len(docs) > 50 and all("::=" not in doc for doc in docs)
