"""`mosaic eval` on prepared data and on text files, with --per-position, --compare, JSON and PNG."""

from __future__ import annotations

import json

from eval_support import STORIES, save_checkpoint_folder

from memory_mosaics.cli import main
from memory_mosaics.data import make_tokenizer


def test_eval_prepared_data_with_per_position_and_compare(byte_runs, byte_data, tmp_path, capsys):
    out_json, out_png = tmp_path / "eval.json", tmp_path / "pos.png"
    argv = ["eval", "--ckpt", str(byte_runs["mosaic"]), "--data", str(byte_data), "--per-position",
            "--compare", str(byte_runs["gpt"]), "--json", str(out_json), "--png", str(out_png)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out_json.read_text())
    assert result["model_type"] == "memory_mosaic" and result["loss"] > 0
    assert abs(result["perplexity"] - 2.718281828 ** result["loss"]) < 1e-6 * result["perplexity"]
    assert len(result["per_position"]) == 32 and result["per_position_mode"] == "documents"
    assert result["compare"][0]["model_type"] == "gpt" and len(result["compare"][0]["per_position"]) == 32
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "loss by position" in printed


def test_eval_text_file_never_seen(byte_runs, tmp_path):
    other = tmp_path / "ood.txt"
    other.write_text("Völlig andere Wörter: ünïcödé text, not a story at all.\n\nA second paragraph.\n")
    assert (
        main(
            [
                "eval",
                "--ckpt",
                str(byte_runs["gpt"]),
                "--data",
                str(other),
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] > 0 and result["per_position"] is None


def test_eval_bad_inputs(byte_runs, byte_data, tmp_path, capsys):
    def error(argv) -> str:
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    bpe = make_tokenizer("bpe", vocab_size=300, texts=STORIES * 20)
    bpe_run = save_checkpoint_folder(tmp_path / "bpe", "mosaic", bpe)
    assert "tokenized with byte" in error(["eval", "--ckpt", str(bpe_run), "--data", str(byte_data)])
    gpt = ["eval", "--ckpt", str(byte_runs["gpt"]), "--data", str(byte_data)]
    assert "larger than the model's block_size 32" in error([*gpt, "--seq-len", "64"])
    assert "does not exist" in error(["eval", "--ckpt", str(tmp_path / "none"), "--data", str(byte_data)])
    assert "does not exist" in error([*gpt, "--json", str(tmp_path / "no" / "r.json")])
    assert not (tmp_path / "no").exists()
