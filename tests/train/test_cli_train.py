"""`mosaic train` end to end, and every bad training input: exit code 2, one line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_support import TINY_MOSAIC, write_stories

from memory_mosaics.cli import main
from memory_mosaics.data import prepare_dataset

TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MOSAIC.items()]
FAST = ["--max-steps=4", "--batch-size=2", "--eval-interval=2", "--eval-batches=1", "--no-progress"]


def mosaic_train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), *FAST, *TINY_FLAGS, *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("mosaic train: error: ")
    return err[0]


def test_train_writes_metrics_plot_and_checkpoint(tiny_data, tmp_path, capsys):
    assert mosaic_train(tiny_data, tmp_path / "run", "--json", str(tmp_path / "summary.json")) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows if r["kind"] == "train")
    assert [r["step"] for r in rows if r["kind"] == "val"] == [2, 4]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = tmp_path / "run" / "checkpoint"
    names = {
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer_state.json",
    }
    assert names <= {p.name for p in ckpt.iterdir()} and (ckpt / "tokenizer").is_dir()
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 4 and summary["finished"] is True
    assert "finished at step 4" in capsys.readouterr().out


def test_gpt_and_yaml_config(tiny_data, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("model: gpt\nn_layer: 1\nn_head: 2\nn_embd: 16\nblock_size: 16\nlr: 5e-3\n")
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "g"), "--config", str(config), *FAST]) == 0
    saved = json.loads((tmp_path / "g" / "run_config.json").read_text())
    assert saved["model_type"] == "gpt" and saved["train_config"]["lr"] == 5e-3
    assert saved["model_config"]["n_embd"] == 16


def test_list_presets(capsys):
    assert main(["train", "--list-presets"]) == 0
    names = capsys.readouterr().out.split()
    assert {"tinystories-cpu", "gpt-tinystories-cpu", "babistories-paper", "gpt-babistories-paper"} <= set(names)


@pytest.fixture(scope="module")
def short_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("short")
    (root / "t.txt").write_text("Tiny.\n", encoding="utf-8")
    prepare_dataset(str(root / "t.txt"), root / "prepared", "byte", val=str(root / "t.txt"))
    return root / "prepared"


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bpe")
    write_stories(root / "t.txt", 60, seed=0)
    prepare_dataset(str(root / "t.txt"), root / "prepared", "bpe", vocab_size=300, val=str(root / "t.txt"))
    return root / "prepared"


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--lr=0"], "lr must be > 0"),
        (["--lr=-1e-3"], "lr must be > 0"),
        (["--max-steps=0"], "max_steps must be > 0"),
        (["--batch-size=-2"], "batch_size must be > 0"),
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--seq-len=32"], "larger than the model's block_size 16"),
        (["--vocab-size=100"], "vocab_size is 100"),
        (["--model=gpt", "--pmem-size=8"], "pmem_size is a setting of the mosaic model"),
    ],
)
def test_bad_settings_exit_2_and_write_nothing(tiny_data, tmp_path, capsys, flags, expected):
    assert mosaic_train(tiny_data, tmp_path / "run", *flags) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_corpus_shorter_than_one_block(short_data, tmp_path, capsys):
    assert mosaic_train(short_data, tmp_path / "run") == 2
    assert "fewer than one window" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_unwritable_output(tiny_data, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    assert mosaic_train(tiny_data, tmp_path / "a-file" / "run") == 2
    assert "a-file" in one_error_line(capsys)
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tiny_data, bpe_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *FAST, *TINY_FLAGS, "--stop-at=2"]) == 0
    capsys.readouterr()
    before = snapshot(run)

    assert mosaic_train(tiny_data, run) == 2  # no --resume: refuse to overwrite
    assert "--resume" in one_error_line(capsys)
    assert mosaic_train(bpe_data, run, "--resume") == 2  # data from another tokenizer
    assert "tokenizer" in one_error_line(capsys)
    assert mosaic_train(tiny_data, tmp_path / "missing", "--resume") == 2
    assert "does not exist" in one_error_line(capsys)
    assert snapshot(run) == before

    # a corrupt checkpoint: refuse, and leave it as it was
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    corrupted = snapshot(run)
    assert mosaic_train(tiny_data, run, "--resume") == 2
    assert "model.safetensors" in one_error_line(capsys)
    (run / "checkpoint" / "trainer_state.json").write_text("{not json")
    corrupted = snapshot(run)
    assert mosaic_train(tiny_data, run, "--resume") == 2
    assert "corrupt" in one_error_line(capsys)
    assert snapshot(run) == corrupted


def test_resume_through_the_cli_continues_to_max_steps(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert mosaic_train(tiny_data, run, "--stop-at=2") == 0
    with (run / "metrics.jsonl").open("a") as f:  # rows written after the checkpoint, one cut short by a crash
        f.write('{"kind": "train", "step": 3, "loss": 1.0}\n{"kind": "train", "st')
    assert mosaic_train(tiny_data, run, "--resume") == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert "finished at step 4" in capsys.readouterr().out
