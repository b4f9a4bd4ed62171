"""`mosaic moons` end to end on a tiny run: the JSON contract, the figures, bad input."""

from __future__ import annotations

import json

import pytest

from memory_mosaics.cli import main

TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "60", "--eval-windows", "2", "--context-stride", "10"]


@pytest.mark.slow
def test_moons_command_writes_json_and_figures(tmp_path, capsys):
    out = tmp_path / "moons"
    assert main(["moons", "--out", str(out), "--json", str(tmp_path / "r.json"), *TINY]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert [run["heads"] for run in results["runs"]] == [1, 3]
    for run in results["runs"]:
        assert 0.0 <= run["disentanglement"] <= 1.0
        assert run["context_lengths"] == [1, 11, 21, 31]  # up to 60 - 25 + 1
        assert len(run["error_vs_context"]) == 4
        assert len(run["one_step_error_vs_context"]) == 60
    assert results["held_out_triple"] == [1.0, 1.5, 2.0]
    for name in (
        "error_vs_context",
        "generations_1head",
        "generations_3head",
        "attention_1head",
        "attention_3head",
        "complex_blocks_1head",
        "complex_blocks_3head",
    ):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["runs"][1]["heads"] == 3
    assert "disentangle" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "steps must be >= 1"),
        (["--seq-len", "801"], "at most 800"),
        (["--json", "/no/such/folder/r.json"], "does not exist"),
    ],
)
def test_moons_command_rejects_bad_input(argv, message, tmp_path, capsys):
    assert main(["moons", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
