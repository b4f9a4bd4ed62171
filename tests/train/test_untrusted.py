"""Run folders and data from strangers: a pickle in place of any file is refused and never run, and
a tampered trainer_state.json is refused with a CheckpointError (or resumes) — never another error."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from train_support import TINY_MOSAIC

from memory_mosaics.data import PreparedData
from memory_mosaics.errors import CheckpointError, MosaicError
from memory_mosaics.train import TrainConfig, train
from memory_mosaics.train.checkpoint import load_model, load_tokenizer_of

CONFIG = TrainConfig(max_steps=4, batch_size=2, eval_interval=2, eval_batches=1, seed=2)


@pytest.fixture(scope="module")
def stopped_run(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stopped") / "run"
    train(tiny_data, run, CONFIG, TINY_MOSAIC, stop_at=2, progress=False)
    return run


def exploit(marker: Path) -> bytes:
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Exploit())


def restate_sizes(ckpt: Path) -> None:
    """List the files' current sizes in trainer_state.json, as a careful attacker would."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["files"] = {name: (ckpt / name).stat().st_size for name in state["files"]}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


# file replaced -> (resuming refuses it, model loading refuses it, tokenizer loading refuses it).
# Resuming reads the data folder's tokenizer, not the checkpoint's, so a bad tokenizer/ only stops
# the commands that use it (sample, inspect --text); the resumed run then saves a good one.
CHECKPOINT_FILES = {
    "config.json": (True, True, True),
    "model.safetensors": (True, True, False),
    "optimizer.safetensors": (True, False, False),
    "rng.safetensors": (True, False, False),
    "trainer_state.json": (True, False, True),
    "tokenizer/tokenizer_config.json": (False, False, True),
}


def refuses(call) -> bool:
    try:
        call()
    except MosaicError:
        return True
    return False


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_pickle_in_place_of_any_checkpoint_file_is_refused_and_not_run(tiny_data, stopped_run, tmp_path, name):
    run, marker = tmp_path / "run", tmp_path / "executed"
    shutil.copytree(stopped_run, run)
    (run / "checkpoint" / name).write_bytes(exploit(marker))
    if name != "trainer_state.json":
        restate_sizes(run / "checkpoint")
    found = (
        refuses(lambda: load_model(run)),
        refuses(lambda: load_tokenizer_of(run)),
        refuses(lambda: train(tiny_data, run, CONFIG, TINY_MOSAIC, resume=True, progress=False)),
    )
    resume, model, tokenizer = CHECKPOINT_FILES[name]
    assert found == (model, tokenizer, resume)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["manifest.json", "train.bin", "tokenizer/tokenizer_config.json"])
def test_a_pickle_in_place_of_any_data_file_is_refused_and_not_run(tiny_data, tmp_path, name):
    data, marker = tmp_path / "data", tmp_path / "executed"
    shutil.copytree(tiny_data, data)
    (data / name).write_bytes(exploit(marker))
    with pytest.raises(MosaicError):
        PreparedData.open(data)
    assert not marker.exists()


JSON_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=5)
    | st.lists(st.integers(-3, 3), max_size=3)
    | st.dictionaries(st.sampled_from(["step", "seed", "0", "lr"]), st.integers(-3, 10), max_size=3)
)
STATE_PATHS = [
    ("step",), ("tokens_seen",), ("elapsed_s",), ("train_config",), ("train_config", "lr"),
    ("train_config", "max_steps"), ("sampler",), ("sampler", "step"), ("sampler", "seed"), ("scaler",),
    ("optimizer",), ("optimizer", "param_groups"), ("optimizer", "scalars"), ("optimizer", "param_groups", 0),
    ("optimizer", "param_groups", 0, "params"), ("optimizer", "param_groups", 0, "lr"), ("data",),
    ("data", "tokenizer_fingerprint"), ("files",), ("format_version",), ("bad_steps",), ("bad_steps_in_a_row",),
]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(STATE_PATHS), value=JSON_VALUES)
def test_a_tampered_trainer_state_is_refused_cleanly(tiny_data, stopped_run, tmp_path, path, value):
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(stopped_run, run)
    state_file = run / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    node = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    state_file.write_text(json.dumps(state))
    try:
        result = train(tiny_data, run, CONFIG, TINY_MOSAIC, resume=True, progress=False)
    except MosaicError:
        return
    assert result.finished  # it resumed: the edit was harmless to the loop


def test_resume_refuses_a_checkpoint_whose_files_are_not_what_it_lists(tiny_data, stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    with (run / "checkpoint" / "rng.safetensors").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match=r"rng\.safetensors is damaged .* no earlier whole checkpoint"):
        train(tiny_data, run, CONFIG, TINY_MOSAIC, resume=True, progress=False)
