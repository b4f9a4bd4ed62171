"""`mosaic inspect` end to end: outputs with and without a tokenizer, and one-line errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

import memory_mosaics
from memory_mosaics import GPT, GPTConfig
from memory_mosaics.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*argv: str) -> int:
    return main(["inspect", *map(str, argv)])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("mosaic inspect: error: ")
    return err[0]


def test_ids_without_tokenizer_writes_all_outputs(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    ids = [5, 17, 5, 17, 5, 299, 0]
    code = run_cli(
        "--ckpt",
        model_dir,
        "--ids",
        ",".join(map(str, ids)),
        "--html",
        out / "p.html",
        "--json",
        out / "r.json",
        "--png",
        out / "s.png",
        "--top-k",
        3,
    )
    assert code == 0
    assert "inspected 7 tokens" in capsys.readouterr().out
    report = json.loads((out / "r.json").read_text())
    assert [tok["id"] for tok in report["tokens"]] == ids
    assert [tok["text"] for tok in report["tokens"]] == [f"#{i}" for i in ids]
    assert report["tokenizer"] is None and report["top_k"] == 3
    assert report["check"]["max_abs_error"] < 1e-5
    assert len(report["retrievals"]) == 7 and len(report["retrievals"][0]) == 2  # positions x layers
    assert all(head["entries"] == [] for layer in report["retrievals"][0] for head in layer["context"])
    assert (out / "s.png").read_bytes()[:8] == PNG_MAGIC
    page = (out / "p.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "#299" in page


def test_text_with_the_runs_tokenizer(run_dir, tmp_path):
    text = "the cat sat. the cat"
    assert run_cli("--ckpt", run_dir, "--text", text, "--json", tmp_path / "r.json") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokenizer"] == "byte"
    assert "".join(tok["text"] for tok in report["tokens"]) == text
    assert report["checkpoint"].endswith("checkpoint")
    # The next-token probability is the model's own softmax at the position before.
    ids = [tok["id"] for tok in report["tokens"]]
    with torch.no_grad():
        probs = torch.softmax(memory_mosaics.load(run_dir / "checkpoint")(torch.tensor([ids]))[0][0], dim=-1)
    for row in report["predictions"][:-1]:
        assert row["next_id"] == ids[row["position"] + 1]
        assert row["next_prob"] == pytest.approx(probs[row["position"], row["next_id"]].item(), abs=2e-6)
        shown = [p["prob"] for p in row["top"]]
        assert shown == sorted(shown, reverse=True)
    assert report["predictions"][-1]["next_id"] is None


def test_file_input(run_dir, tmp_path):
    source = tmp_path / "story.txt"
    source.write_text("Once upon a time\n", encoding="utf-8")
    assert run_cli("--ckpt", run_dir, "--file", source, "--json", tmp_path / "r.json") == 0
    assert len(json.loads((tmp_path / "r.json").read_text())["tokens"]) == len("Once upon a time\n")


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    gpt = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, dropout=0.0))
    return gpt.save_pretrained(tmp_path_factory.mktemp("inspect") / "gpt")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing checkpoint", "does not exist"),
        ("gpt checkpoint", "Memory Mosaic checkpoints only"),
        ("id past the vocabulary", "outside the model's vocabulary [0, 300)"),
        ("negative id", "outside the model's vocabulary"),
        ("not an id", "not an integer"),
        ("no ids", "no tokens"),
        ("text without tokenizer", "no tokenizer/ folder"),
        ("empty text", "the text is empty"),
        ("missing file", "no such file"),
        ("too long", "more than --max-tokens 3"),
        ("no output", "nothing to write"),
        ("output folder missing", "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(case, expected, model_dir, run_dir, gpt_dir, tmp_path, capsys):
    html = tmp_path / "p.html"
    argv = {
        "missing checkpoint": ["--ckpt", tmp_path / "nowhere", "--ids", "1", "--html", html],
        "gpt checkpoint": ["--ckpt", gpt_dir, "--ids", "1", "--html", html],
        "id past the vocabulary": ["--ckpt", model_dir, "--ids", "1,300", "--html", html],
        "negative id": ["--ckpt", model_dir, "--ids", "1,-2", "--html", html],
        "not an id": ["--ckpt", model_dir, "--ids", "1,x", "--html", html],
        "no ids": ["--ckpt", model_dir, "--ids", ",", "--html", html],
        "text without tokenizer": ["--ckpt", model_dir, "--text", "hello", "--html", html],
        "empty text": ["--ckpt", run_dir, "--text", "  ", "--html", html],
        "missing file": ["--ckpt", run_dir, "--file", tmp_path / "none.txt", "--html", html],
        "too long": ["--ckpt", model_dir, "--ids", "1,2,3,4", "--max-tokens", 3, "--html", html],
        "no output": ["--ckpt", model_dir, "--ids", "1"],
        "output folder missing": ["--ckpt", model_dir, "--ids", "1", "--html", tmp_path / "no" / "p.html"],
    }[case]
    assert run_cli(*argv) == 2
    assert expected in one_error_line(capsys)
    assert not html.exists()


def test_help_lists_the_inputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--ckpt", "--text", "--file", "--ids", "--html", "--json", "--png"))
