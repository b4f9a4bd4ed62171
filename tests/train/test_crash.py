"""kill -9 during training, including in the middle of writing a checkpoint: the newest whole
checkpoint still loads, and --resume lands on the losses of a run that never stopped (bitwise).

Each case runs a real `python -m memory_mosaics.cli train` subprocess and kills it with SIGKILL at a
moment drawn from a seeded generator: either from outside, at a random time after training started,
or from inside, at a named stage of a checkpoint write (the MOSAIC_CRASH_AT hook of checkpoint.py),
which a timer would almost never hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import TINY_MOSAIC

from memory_mosaics.cli import main
from memory_mosaics.train.checkpoint import (
    CRASH_ENV,
    find_resumable,
    load_model,
    read_trainer_state,
    resolve_checkpoint,
)

MAX_STEPS, CKPT_EVERY = 8, 2
TRAIN_FLAGS = [
    f"--max-steps={MAX_STEPS}", f"--ckpt-interval={CKPT_EVERY}", "--eval-interval=4", "--eval-batches=1",
    "--batch-size=2", "--lr=3e-3", "--warmup-steps=2", "--seed=11", "--device=cpu", "--no-progress",
]  # fmt: skip
MODEL_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY_MOSAIC, "dropout": 0.1}.items()]
FLAGS = TRAIN_FLAGS + MODEL_FLAGS
SEED = 20261128


def kill_moments() -> list[tuple[str, str, int | float]]:
    """Four seeded moments: a random time, and the three stages of a checkpoint write at random steps."""
    rng = random.Random(SEED)
    steps = list(range(CKPT_EVERY, MAX_STEPS + 1, CKPT_EVERY))
    moments: list[tuple[str, str, int | float]] = [("timer", "after start", round(rng.uniform(0.0, 0.6), 3))]
    # "swapping" needs an earlier checkpoint to move aside; "writing" may hit the first one.
    moments += [("hook", "writing", rng.choice(steps)), ("hook", "swapping", rng.choice(steps[1:]))]
    moments += [("hook", "swapped", rng.choice(steps))]
    return moments


def train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def fork_runs(jobs: list[tuple[list[str], str | None]]) -> None:
    """The subprocess: import once, then fork one `mosaic train` per job (argv, crash_at).

    Prints each child's pid as it starts, then each child's end as JSON. Forking after the imports
    saves each run the seconds an interpreter takes to import torch.
    """
    import matplotlib.pyplot  # noqa: F401 (imported once, for every child's loss.png)

    pids = []
    for argv, crash_at in jobs:
        pid = os.fork()
        if pid == 0:
            if crash_at:
                os.environ[CRASH_ENV] = crash_at
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # keep the pid lines apart from run output
            os._exit(main(argv))
        print(pid, flush=True)
        pids.append(pid)
    for pid in pids:
        status = os.waitpid(pid, 0)[1]
        print(json.dumps({"pid": pid, "signal": os.WIFSIGNALED(status) and os.WTERMSIG(status)}), flush=True)


def start_runs(jobs: list[tuple[list[str], str | None]]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(CRASH_ENV, None)
    code = f"import test_crash; test_crash.fork_runs({jobs!r})"
    here = Path(__file__).parent
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=here, stdout=subprocess.PIPE, text=True)


def kill_after_start(pid: int, run: Path, delay: float) -> None:
    """SIGKILL `delay` seconds after the run's first metrics row appears."""
    deadline = time.monotonic() + 60
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").stat().st_size:
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):  # it finished first: resuming a finished run is tested too
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *FLAGS]) == 0
    return run


def test_kill_at_random_moments_then_resume(tiny_data, uninterrupted, tmp_path):
    moments = kill_moments()
    runs = [tmp_path / f"run{i}" for i in range(len(moments))]
    argv = [["train", "--data", str(tiny_data), "--out", str(run), *FLAGS] for run in runs]
    jobs = [
        (args, f"{what}:{when}" if how == "hook" else None)
        for args, (how, what, when) in zip(argv, moments, strict=True)
    ]
    proc = start_runs(jobs)
    pids = [int(proc.stdout.readline()) for _ in jobs]
    for (how, _, when), pid, run in zip(moments, pids, runs, strict=True):
        if how == "timer":
            kill_after_start(pid, run, when)
    ends = [json.loads(line) for line in proc.stdout]
    assert proc.wait(timeout=120) == 0 and [e["pid"] for e in ends] == pids
    killed = [e["signal"] == signal.SIGKILL for e in ends]

    expected = train_losses(uninterrupted)
    final_weights = load_file(str(uninterrupted / "checkpoint" / "model.safetensors"))
    for (how, what, when), was_killed, run, args in zip(moments, killed, runs, argv, strict=True):
        label = f"{how} {what} {when}"
        if how == "hook":
            assert was_killed, label
            assert (run / "checkpoint.tmp").exists() or what == "swapped", label
        # The newest whole checkpoint loads: the one being replaced, unless the new one was in place.
        saved = {"writing": when - CKPT_EVERY, "swapping": when - CKPT_EVERY, "swapped": when}.get(what)
        if saved != 0 and ((run / "checkpoint").exists() or (run / "checkpoint.prev").exists()):
            folder = resolve_checkpoint(run)
            load_model(folder)
            step = read_trainer_state(folder)["step"]
            assert saved is None or step == saved, (label, step)

        assert main([*args, "--resume"]) == 0, label
        assert train_losses(run) == expected, label  # every step, compared bitwise
        weights = load_file(str(run / "checkpoint" / "model.safetensors"))
        assert all(torch.equal(weights[k], final_weights[k]) for k in final_weights), label
        assert not (run / "checkpoint.tmp").exists() and not (run / "checkpoint.prev").exists(), label


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_whole_one(tiny_data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(run), *FLAGS]
    assert main([*args, "--stop-at=2"]) == 0
    shutil.copytree(run / "checkpoint", tmp_path / "step2")
    assert main([*args, "--stop-at=4", "--resume"]) == 0
    shutil.copytree(tmp_path / "step2", run / "checkpoint.prev")  # as a crash before .prev was removed
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # the newest lost its tail (a disk that lied about fsync)

    assert find_resumable(run) == run / "checkpoint.prev"
    assert resolve_checkpoint(run) == run / "checkpoint.prev"
    assert read_trainer_state(find_resumable(run))["step"] == 2
    assert main([*args, "--resume"]) == 0
    assert read_trainer_state(run / "checkpoint")["step"] == MAX_STEPS
    assert train_losses(run) == train_losses(uninterrupted)


def test_a_run_killed_before_its_first_checkpoint_restarts_from_step_0(tiny_data, uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *FLAGS, "--stop-at=2"]) == 0
    shutil.rmtree(run / "checkpoint")  # as a kill while the first checkpoint was being written leaves it
    (run / "checkpoint.tmp").mkdir()
    (run / "checkpoint.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
    resume = ["train", "--data", str(tiny_data), "--out", str(run), *TRAIN_FLAGS, "--resume"]
    assert main([*resume, "--n-embd=32"]) == 2  # the model it was started with, or nothing
    assert "n_embd is 32" in capsys.readouterr().err
    assert main(resume) == 0  # the model flags are read from run_config.json, as from a checkpoint
    assert train_losses(run) == train_losses(uninterrupted)


def soak(seeds: list[int]) -> None:
    """More kill moments than the suite runs: `python tests/train/test_crash.py 1 2 3` runs the test
    once per seed (4 kills each) and prints the moments and where each timer kill landed."""
    import tempfile

    from train_support import write_stories

    from memory_mosaics.data import prepare_dataset

    global SEED, kill_after_start
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    write_stories(root / "train.txt", 60, seed=0), write_stories(root / "val.txt", 10, seed=1)
    prepare_dataset(str(root / "train.txt"), root / "data", "byte", val=str(root / "val.txt"))
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "full"), *FLAGS]) == 0
    timer_kill = kill_after_start

    def recording_kill(pid: int, run: Path, delay: float) -> None:
        timer_kill(pid, run, delay)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
        print(json.dumps({"timer kill after step": rows[-1]["step"] if rows else 0}), flush=True)

    kill_after_start = recording_kill
    for seed in seeds:
        SEED = seed
        (root / str(seed)).mkdir()
        test_kill_at_random_moments_then_resume(root / "data", root / "full", root / str(seed))
        print(json.dumps({"seed": seed, "moments survived": kill_moments()}), flush=True)
    print(f"{4 * len(seeds)} kills, every resumed run bitwise equal to the uninterrupted one")


if __name__ == "__main__":
    soak([int(seed) for seed in sys.argv[1:]] or [SEED])
