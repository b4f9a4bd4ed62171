"""One table of bad inputs across the command line and the Python API.

Every case must end with exit code 2 and one clear line on stderr (CLI) or a typed MosaicError (API),
and must leave every file that existed before byte for byte as it was, without adding any (each case
hashes a shared world of prepared data and a trained run, plus its own scratch folder, before and
after). Faults of the machine are simulated: a full disk by making a writer raise ENOSPC, a
read-only folder by chmod, or, where the tests run as root (chmod does not stop root), by making
writes under that folder raise EACCES.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import memory_mosaics
from memory_mosaics.cli import main
from memory_mosaics.data import PreparedData, prepare_dataset
from memory_mosaics.data.errors import ShardError, TokenizerError
from memory_mosaics.data.shards import read_shard
from memory_mosaics.data.tokenizers import load_tokenizer
from memory_mosaics.errors import CheckpointError, ConfigError, MosaicError
from memory_mosaics.train import TrainConfig, train

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 16, "pmem_size": 16, "block_size": 16, "dropout": 0.0}
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
FAST = ["--max-steps=4", "--batch-size=2", "--eval-interval=2", "--eval-batches=1", "--no-progress"]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
PROGRESS = re.compile(r"^[\w ]+:\s+\d+%\|")  # a progress bar drawn before the error (eval's)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Prepared byte and bpe data, and a tiny run stopped at step 2 (so it can be resumed)."""
    root = tmp_path_factory.mktemp("world")
    stories = [f"{n} had a {t}. {n} liked the {t}." for n in ("Tom", "Mia", "Sam") for t in ("cat", "ball", "cake")]
    (root / "stories.txt").write_text("\n<|endoftext|>\n".join(stories * 4) + "\n", encoding="utf-8")
    prepare_dataset(str(root / "stories.txt"), root / "data", "byte", val=str(root / "stories.txt"))
    prepare_dataset(str(root / "stories.txt"), root / "bpe", "bpe", vocab_size=300, val=str(root / "stories.txt"))
    config = TrainConfig(max_steps=4, batch_size=2, eval_interval=2, eval_batches=1)
    train(root / "data", root / "run", config, TINY, stop_at=2, progress=False)
    return root


# ---------------------------------------------------------------------------------------------------
# The cases. Each `make` gets (world, scratch, monkeypatch) and returns the CLI arguments (a list) or
# the API call (a function); `expect` is a piece of the message. `may_change` names files of the
# scratch folder a case may legitimately append to (rows of a run that trained before the fault).


@dataclass
class Case:
    name: str
    expect: str
    make: Callable
    error: type[Exception] = MosaicError  # for API cases
    may_change: tuple[str, ...] = field(default=())


def copy_run(world: Path, scratch: Path) -> Path:
    shutil.copytree(world / "run", scratch / "run")
    return scratch / "run"


def copy_data(world: Path, scratch: Path) -> Path:
    shutil.copytree(world / "data", scratch / "data")
    return scratch / "data"


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def restate_sizes(ckpt: Path) -> None:
    """Make trainer_state.json list the files' current sizes, as a hostile author would."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["files"] = {name: (ckpt / name).stat().st_size for name in state["files"]}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def read_only(folder: Path, monkeypatch) -> Path:
    """A folder nobody may write into: chmod, and where that does not bind (root) refuse writes there."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    try:
        (folder / ".probe").write_text("")
    except PermissionError:
        return folder
    (folder / ".probe").unlink()  # running as root: simulate what chmod does for everyone else
    real_open, real_mkdir = builtins.open, os.mkdir

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(folder)

    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def guarded_open(path, mode="r", *args, **kwargs):
        if inside(path) and any(c in mode for c in "wax+"):
            raise denied(path)
        return real_open(path, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    return folder


def pickled_exploit(marker: Path) -> bytes:
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Exploit())


def shard_with_header(world: Path, scratch: Path, offset: int, fmt: str, value: int) -> Path:
    data = copy_data(world, scratch)
    raw = bytearray((data / "train.bin").read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    (data / "train.bin").write_bytes(bytes(raw))
    return data


def prepare_cli(source, out, *extra) -> list[str]:
    return ["prepare", "--data", str(source), "--tokenizer", "byte", "--out", str(out), *extra]


def eval_cli(ckpt, data, *extra) -> list[str]:
    return ["eval", "--ckpt", str(ckpt), "--data", str(data), *extra]


def truncated_shard(world: Path, scratch: Path) -> Path:
    data = copy_data(world, scratch)
    (data / "train.bin").write_bytes((world / "data" / "train.bin").read_bytes()[:-7])
    return data


def train_cli(data, out, *extra) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *FAST, *TINY_FLAGS, *extra]


def resume_cli(world, run) -> list[str]:
    return train_cli(world / "data", run, "--resume", "--max-steps=4")


def damaged_state(world, scratch, **changes) -> list[str]:
    run = copy_run(world, scratch)
    edit_json(run / "checkpoint" / "trainer_state.json", **changes)
    restate_sizes(run / "checkpoint")
    return resume_cli(world, run)


def int_weights(world, scratch, monkeypatch) -> list[str]:
    run = copy_run(world, scratch)
    path = run / "checkpoint" / "model.safetensors"
    save_file({k: v.to(torch.int32) for k, v in load_file(str(path)).items()}, str(path))
    restate_sizes(run / "checkpoint")
    return ["eval", "--ckpt", str(run), "--data", str(world / "data")]


def pickled_optimizer(world, scratch, monkeypatch) -> list[str]:
    run = copy_run(world, scratch)
    write(run / "checkpoint" / "optimizer.safetensors", pickled_exploit(scratch / "executed"))
    restate_sizes(run / "checkpoint")
    return resume_cli(world, run)


def swapped_tokenizer(world, scratch, monkeypatch) -> list[str]:
    run = copy_run(world, scratch)
    shutil.rmtree(run / "checkpoint" / "tokenizer")
    shutil.copytree(world / "bpe" / "tokenizer", run / "checkpoint" / "tokenizer")
    return ["sample", "--ckpt", str(run), "--prompt", "Tom", "--max-new-tokens", "2"]


def full_disk_at_checkpoint(world, scratch, monkeypatch) -> list[str]:
    run = copy_run(world, scratch)

    def no_space(*args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr("memory_mosaics.train.checkpoint.save_file", no_space)
    return resume_cli(world, run)


def full_disk_in_prepare(world, scratch, monkeypatch) -> list[str]:
    def no_space(self, tokens):
        raise ENOSPC

    monkeypatch.setattr("memory_mosaics.data.shards.ShardWriter.write", no_space)
    return ["prepare", "--data", str(world / "stories.txt"), "--tokenizer", "byte", "--out", str(scratch / "p")]


def full_disk_for_json(world, scratch, monkeypatch) -> list[str]:
    def no_space(self, *args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr(Path, "write_text", no_space)
    return ["eval", "--ckpt", str(world / "run"), "--data", str(world / "data"), "--json", str(scratch / "r.json")]


def api_train_on_full_disk(world, scratch, monkeypatch):
    full_disk_at_checkpoint(world, scratch, monkeypatch)
    config = TrainConfig(max_steps=4, batch_size=2, eval_interval=2, eval_batches=1)
    return lambda: train(world / "data", scratch / "run", config, TINY, resume=True, progress=False)


def api_huge_config(world, scratch, monkeypatch):
    shutil.copytree(world / "run" / "checkpoint", scratch / "m")
    edit_json(scratch / "m" / "config.json", vocab_size=10**9)
    return lambda: memory_mosaics.load(scratch / "m")


def api_manifest(world, scratch, **tokenizer_changes):
    data = copy_data(world, scratch)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"].update(tokenizer_changes)
    (data / "manifest.json").write_text(json.dumps(manifest))
    return lambda: PreparedData.open(data)


def api_tokenizer_file(world, scratch, name: str, content: bytes):
    shutil.copytree(world / "bpe" / "tokenizer", scratch / "tok")
    write(scratch / "tok" / name, content)
    return lambda: load_tokenizer(scratch / "tok")


GARBAGE = bytes(range(256)) * 3
WORDPIECE = json.dumps({"version": "1.0", "model": {"type": "WordPiece", "vocab": {"a": 0}}, "added_tokens": []})

CASES = [
    # -- mosaic prepare ------------------------------------------------------------------------------
    Case("prepare: missing source", "not found",
         lambda w, s, m: prepare_cli(s / "nope.txt", s / "p")),
    Case("prepare: empty source", "is empty",
         lambda w, s, m: prepare_cli(write(s / "e.txt", ""), s / "p")),
    Case("prepare: binary source", "not UTF-8 text",
         lambda w, s, m: prepare_cli(write(s / "b.txt", GARBAGE), s / "p")),
    Case("prepare: Latin-1 text", "not UTF-8 text",
         lambda w, s, m: prepare_cli(write(s / "l.txt", "café".encode("latin-1")), s / "p")),
    Case("prepare: negative vocabulary", "out of range",
         lambda w, s, m: prepare_cli(w / "stories.txt", s / "p", "--tokenizer=bpe", "--vocab-size=-5")),
    Case("prepare: huge vocabulary", "out of range",
         lambda w, s, m: prepare_cli(w / "stories.txt", s / "p", "--tokenizer=bpe", f"--vocab-size={10**12}")),
    Case("prepare: full disk", "No space left on device", full_disk_in_prepare),
    Case("prepare: read-only output folder", "Permission denied",
         lambda w, s, m: prepare_cli(w / "stories.txt", read_only(s / "ro", m) / "p")),
    # -- mosaic train: data ----------------------------------------------------------------------------
    Case("train: folder without manifest", "manifest.json is missing",
         lambda w, s, m: train_cli(write(s / "d" / "x.txt", "x").parent, s / "r")),
    Case("train: garbage manifest", "not valid JSON",
         lambda w, s, m: train_cli(write(copy_data(w, s) / "manifest.json", GARBAGE).parent, s / "r")),
    Case("train: truncated shard", "truncated",
         lambda w, s, m: train_cli(truncated_shard(w, s), s / "r")),
    Case("train: shard header claims 2**60 tokens", "header promises 1152921504606846976 tokens",
         lambda w, s, m: train_cli(shard_with_header(w, s, 16, "<Q", 2**60), s / "r")),
    Case("train: shard of an unknown dtype", "unknown dtype code 8",
         lambda w, s, m: train_cli(shard_with_header(w, s, 12, "<I", 8), s / "r")),
    # -- mosaic train: settings -----------------------------------------------------------------------
    Case("train: binary --config", "not UTF-8 text",
         lambda w, s, m: train_cli(w / "data", s / "r", "--config", str(write(s / "c.yaml", GARBAGE)))),
    Case("train: --config of the wrong type", "seed must be int, got 'two'",
         lambda w, s, m: train_cli(w / "data", s / "r", "--config", str(write(s / "c.yaml", "seed: two\n")))),
    Case("train: --config that is a list", "expected a mapping",
         lambda w, s, m: train_cli(w / "data", s / "r", "--config", str(write(s / "c.yaml", "- 1\n- 2\n")))),
    Case("train: negative layer count", "n_layer must be >= 1",
         lambda w, s, m: train_cli(w / "data", s / "r", "--n-layer=-1")),
    Case("train: model too big for memory", "GiB",
         lambda w, s, m: train_cli(w / "data", s / "r", "--n-embd=4000000", "--n-head=1")),
    Case("train: read-only output folder", "Permission denied",
         lambda w, s, m: train_cli(w / "data", read_only(s / "ro", m) / "r")),
    # -- mosaic train --resume: hostile or damaged checkpoints ---------------------------------------------
    Case("resume: pickle named optimizer.safetensors", "optimizer.safetensors is corrupt", pickled_optimizer),
    Case("resume: negative step", "field 'step' is negative", lambda w, s, m: damaged_state(w, s, step=-3)),
    Case("resume: step of the wrong type", "field 'step' is 'x'", lambda w, s, m: damaged_state(w, s, step="x")),
    Case("resume: full disk while checkpointing", "No space left on device", full_disk_at_checkpoint,
         may_change=("run/metrics.jsonl", "run/loss.png")),
    # -- mosaic eval / sample / inspect ---------------------------------------------------------------------------
    Case("eval: binary config.json", "not valid JSON",
         lambda w, s, m: eval_cli(write(copy_run(w, s) / "checkpoint" / "config.json", GARBAGE).parent, w / "data")),
    Case("eval: integer weights", "expected a float dtype", int_weights),
    Case("eval: data of another tokenizer", "tokenized with bpe",
         lambda w, s, m: ["eval", "--ckpt", str(w / "run"), "--data", str(w / "bpe")]),
    Case("eval: --json on a full disk", "No space left on device", full_disk_for_json),
    Case("eval: --json in a read-only folder", "Permission denied",
         lambda w, s, m: eval_cli(w / "run", w / "data", "--json", str(read_only(s / "ro", m) / "r.json"))),
    Case("sample: tokenizer of another checkpoint", "does not belong to this checkpoint", swapped_tokenizer),
    Case("sample: negative length", "--max-new-tokens must be >= 0",
         lambda w, s, m: ["sample", "--ckpt", str(w / "run"), "--max-new-tokens", "-1"]),
    Case("inspect: prompt longer than allowed", "more than --max-tokens 256",
         lambda w, s, m: ["inspect", "--ckpt", str(w / "run"), "--text", "a" * 300, "--json", str(s / "i.json")]),
    Case("inspect: token id >= vocabulary", "token id 257 is outside the model's vocabulary",
         lambda w, s, m: ["inspect", "--ckpt", str(w / "run"), "--ids", "1,2,257", "--json", str(s / "i.json")]),
    # -- the Python API -----------------------------------------------------------------------------------------
    Case("api: train on a full disk", "the previous checkpoint .* is kept", api_train_on_full_disk,
         error=CheckpointError, may_change=("run/metrics.jsonl", "run/loss.png")),
    Case("api: load a config with a huge vocabulary", "need at least", api_huge_config, error=CheckpointError),
    Case("api: manifest's tokenizer outside the folder", "not a folder name inside the data folder",
         lambda w, s, m: api_manifest(w, s, folder="../bpe/tokenizer"), error=ShardError),
    Case("api: manifest's vocab_size of the wrong type", "tokenizer vocab_size is '257', expected int",
         lambda w, s, m: api_manifest(w, s, vocab_size="257"), error=ShardError),
    Case("api: random bytes as a shard", "not a mosaic token shard",
         lambda w, s, m: (lambda shard: lambda: read_shard(shard))(write(s / "x.bin", GARBAGE)), error=ShardError),
    Case("api: binary tokenizer_config.json", "not valid JSON",
         lambda w, s, m: api_tokenizer_file(w, s, "tokenizer_config.json", GARBAGE), error=TokenizerError),
    Case("api: a WordPiece file as bpe.json", "corrupt",
         lambda w, s, m: api_tokenizer_file(w, s, "bpe.json", WORDPIECE.encode()), error=TokenizerError),
    Case("api: max_bad_steps 0", "max_bad_steps must be > 0",
         lambda w, s, m: lambda: TrainConfig(max_bad_steps=0), error=ConfigError),
]  # fmt: skip


def hashes(*folders: Path) -> dict[str, str]:
    return {
        f"{i}/{p.relative_to(folder)}": hashlib.sha256(p.read_bytes()).hexdigest()
        for i, folder in enumerate(folders)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_table_is_large_and_has_no_duplicates():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)
    assert sum(c.name.startswith("api:") for c in CASES) >= 5


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world, tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    action = case.make(world, scratch, monkeypatch)
    before = hashes(world, scratch)
    if isinstance(action, list):
        assert main(action) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not PROGRESS.match(line)]
        assert len(err) == 1, err
        assert err[0].startswith(f"mosaic {action[0]}: error: ") and case.expect in err[0], err[0]
    else:
        with pytest.raises(case.error, match=case.expect):
            action()
    monkeypatch.undo()
    after = hashes(world, scratch)
    allowed = {f"1/{name}" for name in case.may_change}
    assert {k: v for k, v in after.items() if k not in allowed} == {
        k: v for k, v in before.items() if k not in allowed
    }, "files written before the bad input changed, or new files appeared"
    if (scratch / "run").exists():
        assert not (scratch / "run" / "checkpoint.tmp").exists()
    for folder in scratch.rglob("ro"):
        folder.chmod(0o755)


# Unusual but valid Unicode is not a bad input: it must go through prepare, the shards and the
# tokenizers unchanged, and through sampling. (A NUL character is refused as binary, clearly:
# corpora.py documents it, and the table's "binary source" case covers that path.)
UNUSUAL = [
    "\ufeffa byte-order mark, then e\u0301 (combining) and \u00e9 (precomposed)",
    "right to left: \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 with \u200f marks \u202e override",
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467, flag \U0001f1eb\U0001f1f7, skin \U0001f44d\U0001f3fd",
    "astral \U0001d4d0\U0001d4f5\U0001d4fc and noncharacters \ufffe\uffff\U0010ffff",
    "separators\u2028line\u2029paragraph\u00a0nbsp\u3000ideographic space, zero\u200bwidth",
    "CJK \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 and \ud55c\uad6d\uc5b4, a literal <|endoftext|> inside",
]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_unusual_unicode_works_end_to_end(tmp_path, kind):
    source = tmp_path / "unusual.txt"
    source.write_text("\n<|endoftext|>\n".join(UNUSUAL * 3) + "\n", encoding="utf-8")
    extra = {"vocab_size": 300} if kind == "bpe" else {}
    prepare_dataset(str(source), tmp_path / "data", kind, val=str(source), **extra)
    data = PreparedData.open(tmp_path / "data")
    tokens, eot = [int(t) for t in data.split("train")], data.tokenizer.eot_id
    ends = [i for i, t in enumerate(tokens) if t == eot]
    documents = [data.tokenizer.decode(tokens[a + 1 : b]) for a, b in zip([-1, *ends], ends, strict=False)]
    assert [d.strip("\n") for d in documents] == UNUSUAL * 3


def test_unusual_unicode_prompt_samples(world, capsys):
    prompt = UNUSUAL[2]
    assert (
        main(["sample", "--ckpt", str(world / "run"), "--prompt", prompt, "--max-new-tokens", "3", "--seed", "1"]) == 0
    )
    assert capsys.readouterr().out.startswith(prompt)
