"""`mosaic prepare` end to end, `PreparedData.open` checks, and every bad input of the data half."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from memory_mosaics.cli import main
from memory_mosaics.data import (
    PreparedData,
    ShardError,
    encode_documents,
    make_tokenizer,
    open_corpus,
    prepare_dataset,
)
from memory_mosaics.data.errors import CorpusError, DataError, TokenizerError

GPT2_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gpt2"
STORIES = [f"Story {i}: the fox number {i} ran {'far ' * (i % 5)}and slept. Ünïcödé ✓" for i in range(40)]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES), encoding="utf-8")
    return path


def prepare(capsys, *args):
    """Run `mosaic prepare ARGS`; return (exit code, stdout, stderr)."""
    code = main(["prepare", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stream_documents(data: PreparedData, split: str) -> list[str]:
    text = data.tokenizer.decode(data.split(split).tolist())
    assert text.endswith("<|endoftext|>")
    return text.split("<|endoftext|>")[:-1]


def test_prepare_byte_corpus_end_to_end(tmp_path, corpus, capsys):
    out = tmp_path / "data"
    code, stdout, _ = prepare(
        capsys, "--data", corpus, "--tokenizer", "byte", "--val-fraction", "0.25", "--out", out,
        "--json", tmp_path / "m.json",
    )  # fmt: skip
    assert code == 0 and "train" in stdout and "val" in stdout
    data = PreparedData.open(out)
    assert (data.vocab_size, data.eot_id, data.tokenizer.name) == (257, 256, "byte")
    train, val = stream_documents(data, "train"), stream_documents(data, "val")
    assert sorted(train + val) == sorted(STORIES) and val  # every document, once, whole
    assert train == [s for s in STORIES if s in train]  # corpus order kept
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest == data.manifest
    assert manifest["splits"]["val"]["documents"] == len(val)
    assert manifest["splits"]["train"]["tokens"] == len(data.split("train"))
    assert manifest["dtype"] == "uint16" and data.split("train").dtype == np.uint16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "data", "m.json"]  # no leftovers


def test_encode_documents_matches_the_prepared_stream(tmp_path, corpus):
    prepare_dataset(str(corpus), tmp_path / "d", "byte", val=str(corpus))
    data = PreparedData.open(tmp_path / "d")
    stream = encode_documents(data.tokenizer, open_corpus(str(corpus)).documents())
    assert stream.dtype == np.int64 and (stream == data.split("val")).all() and len(stream) > len(STORIES)
    assert encode_documents(data.tokenizer, []).shape == (0,)


def test_prepare_is_deterministic_and_the_seed_changes_the_split(tmp_path, corpus):
    manifests = [
        prepare_dataset(str(corpus), tmp_path / name, "byte", val_fraction=0.3, seed=seed)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    shas = [m["splits"]["val"]["shards"][0]["sha256"] for m in manifests]
    assert shas[0] == shas[1] != shas[2]


def test_prepare_bpe_with_separate_val_source(tmp_path, corpus, capsys):
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps({"text": f"A held-out tale {i}."}) for i in range(3)))
    out = tmp_path / "data"
    code, _, _ = prepare(
        capsys, "--data", corpus, "--val", val, "--tokenizer", "bpe", "--vocab-size", 300, "--out", out
    )
    assert code == 0
    data = PreparedData.open(out)
    assert data.tokenizer.name == "bpe" and 257 < data.vocab_size <= 300
    assert data.manifest["tokenizer"]["fingerprint"] == data.tokenizer.fingerprint()
    assert stream_documents(data, "val") == [f"A held-out tale {i}." for i in range(3)]
    assert stream_documents(data, "train") == STORIES
    # the tokenizer was trained on the train documents: they compress better than bytes
    assert len(data.split("train")) < 0.8 * sum(len(s.encode()) for s in STORIES)


def test_prepare_python_stdlib_slice(tmp_path, capsys):
    out = tmp_path / "stdlib"
    code, _, _ = prepare(
        capsys, "--data", "python-stdlib", "--max-docs", 12, "--val-fraction", 0.3, "--seed", 3,
        "--tokenizer", "bpe", "--vocab-size", 400, "--out", out,
    )  # fmt: skip
    assert code == 0
    data = PreparedData.open(out)
    splits = data.manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 12
    assert splits["val"]["documents"] > 0
    assert "python-stdlib" in data.manifest["source"]["train"]
    assert "def " in data.tokenizer.decode(data.split("train")[:20000].tolist())


@pytest.mark.skipif(not (GPT2_DIR / "encoder.json").is_file(), reason=f"no GPT-2 files in {GPT2_DIR}")
def test_prepare_gpt2_offline(tmp_path, corpus, capsys):
    out = tmp_path / "data"
    code, _, _ = prepare(capsys, "--data", corpus, "--tokenizer", "gpt2", "--gpt2-dir", GPT2_DIR, "--out", out)
    assert code == 0
    data = PreparedData.open(out)
    assert data.eot_id == 50256 and data.split("train").dtype == np.uint16
    assert {p.name for p in (out / "tokenizer").iterdir()} >= {"encoder.json", "vocab.bpe"}
    first = data.split("train")[:5].tolist()
    assert first == data.tokenizer.encode(STORIES[0])[:5] or first == data.tokenizer.encode(STORIES[1])[:5]


def test_out_folder_is_never_overwritten_without_force(tmp_path, corpus, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = prepare(capsys, "--data", corpus, "--tokenizer", "byte", "--out", out)
    assert code == 2 and "refusing to overwrite" in err and "--force" in err
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, _ = prepare(capsys, "--data", corpus, "--tokenizer", "byte", "--out", out, "--force")
    assert code == 0 and not (out / "precious.txt").exists()
    PreparedData.open(out)
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert prepare(capsys, "--data", corpus, "--tokenizer", "byte", "--out", tmp_path / "empty")[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/missing.txt", "--tokenizer", "byte"], "not found"),
        (["--data", "{tmp}/empty.txt", "--tokenizer", "byte"], "is empty"),
        (["--data", "{tmp}/blank.txt", "--tokenizer", "byte"], "train split has no documents"),
        (["--data", "{tmp}/garbage.txt", "--tokenizer", "byte"], "not UTF-8 text"),
        (["--data", "{corpus}", "--tokenizer", "bpe", "--vocab-size", "100"], "out of range"),
        (["--data", "{corpus}", "--tokenizer", "bpe", "--vocab-size", "99999999"], "out of range"),
        (
            ["--data", "{corpus}", "--tokenizer", "byte", "--vocab-size", "500"],
            "applies to --tokenizer bpe only",
        ),
        (["--data", "{corpus}", "--tokenizer", "byte", "--val-fraction", "1.5"], "--val-fraction 1.5"),
        (
            ["--data", "{corpus}", "--tokenizer", "byte", "--val-fraction", "1e-9"],
            "val split has no documents",
        ),
        (["--data", "{corpus}", "--tokenizer", "byte", "--max-docs", "0"], "--max-docs 0"),
        (["--data", "{corpus}", "--tokenizer", "byte", "--format", "jsonl"], "not valid JSON"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, corpus, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "garbage.txt").write_bytes(bytes(range(128, 256)) * 4)
    args = [a.format(tmp=tmp_path, corpus=corpus) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = prepare(capsys, *args, "--out", tmp_path / "out")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mosaic prepare: error:") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out folder, no staging left


def test_unknown_tokenizer_and_unwritable_out(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses unknown choices itself
        main(["prepare", "--data", str(corpus), "--tokenizer", "wordpiece", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "invalid choice: 'wordpiece'" in capsys.readouterr().err
    with pytest.raises(TokenizerError, match="unknown tokenizer 'wordpiece'"):
        prepare_dataset(str(corpus), tmp_path / "o", "wordpiece")
    (tmp_path / "a_file").write_text("x")
    code, _, err = prepare(capsys, "--data", corpus, "--tokenizer", "byte", "--out", tmp_path / "a_file" / "sub")
    assert code == 2 and "cannot write --out" in err
    code, _, err = prepare(capsys, "--data", corpus, "--tokenizer", "byte", "--out", tmp_path / "a_file")
    assert code == 2 and "is not a folder" in err


@pytest.fixture()
def prepared(tmp_path, corpus):
    out = tmp_path / "data"
    prepare_dataset(str(corpus), out, "byte", val_fraction=0.25)
    return out


def test_open_refuses_missing_and_malformed_manifests(tmp_path, prepared):
    with pytest.raises(ShardError, match=r"manifest\.json is missing.*mosaic prepare"):
        PreparedData.open(tmp_path / "nowhere")
    manifest = json.loads((prepared / "manifest.json").read_text())
    (prepared / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ShardError, match="format_version 99"):
        PreparedData.open(prepared)
    del manifest["splits"]["val"]
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="malformed"):
        PreparedData.open(prepared)


def test_open_refuses_truncated_and_corrupt_shards(prepared):
    shard = prepared / "train.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-1])
    with pytest.raises(ShardError, match=r"train\.bin is truncated"):
        PreparedData.open(prepared)
    flipped = bytearray(raw)
    flipped[-1] ^= 1  # same size, one token changed: only the checksum can tell
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ShardError, match=r"train\.bin is corrupt: its sha256"):
        PreparedData.open(prepared)
    # without verify the flipped token reads back as it is on disk: EOT 256 with its high bit cleared
    assert PreparedData.open(prepared, verify=False).split("train")[-1] == 0
    (prepared / "val.bin").unlink()
    with pytest.raises(ShardError, match=r"val\.bin does not exist"):
        PreparedData.open(prepared, verify=False)


def test_open_refuses_a_tokenizer_that_does_not_match_the_shards(prepared):
    shutil.rmtree(prepared / "tokenizer")
    make_tokenizer("bpe", vocab_size=260, texts=["other text"]).save(prepared / "tokenizer")
    with pytest.raises(ShardError, match="mixes two preparations"):
        PreparedData.open(prepared)


def test_split_names_are_checked(prepared):
    with pytest.raises(DataError, match="no split 'test'"):
        PreparedData.open(prepared).split("test")


def test_library_errors_are_mosaic_errors(tmp_path):
    from memory_mosaics.errors import MosaicError

    with pytest.raises(MosaicError):
        prepare_dataset(str(tmp_path / "missing.txt"), tmp_path / "o", "byte")
    assert issubclass(CorpusError, MosaicError) and issubclass(ShardError, MosaicError)


def test_progress_bars_go_to_stderr(tmp_path, corpus, capsys):
    prepare_dataset(str(corpus), tmp_path / "d", "bpe", vocab_size=270, val_fraction=0.3, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    for task in ("training bpe", "tokenizing train", "tokenizing val"):
        assert f"{task} (reading {corpus}): " in captured.err
    assert "40doc" in captured.err
