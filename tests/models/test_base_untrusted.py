"""Loading models written by strangers: no pickle on any load path, and any tampered config.json is
refused with a CheckpointError (or loads a model that matches its weights) — never another exception,
never an allocation the weights file does not justify."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import memory_mosaics
import memory_mosaics.models.baselines
from memory_mosaics import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.errors import CheckpointError
from memory_mosaics.models.base import MODEL_TYPES, min_param_count

ROOT = Path(__file__).resolve().parents[2]
# Calls that can run code from a file: unpickling in all its forms, and YAML's non-safe loaders.
UNSAFE = re.compile(
    r"torch\.load\(|\bimport pickle|\bfrom pickle\b|\bpickle\.|\bcPickle\b|\bdill\b|\bjoblib\b|\bmarshal\.|"
    r"\bshelve\.|(np|numpy)\.load\(|allow_pickle\s*=\s*True|yaml\.(load|unsafe_load|full_load)\(|"
    r"yaml\.(Loader|UnsafeLoader|FullLoader)\b"
)


def code_lines(path: Path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.lstrip().startswith("#"):
            yield number, line


def test_no_pickle_or_unsafe_loader_anywhere_in_the_package_or_benchmarks():
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) > 50  # the scan really looked at the package
    found = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files for n, line in code_lines(p) if UNSAFE.search(line)
    ]
    assert not found, "a load path that can run code:\n" + "\n".join(found)


def test_the_scan_would_catch_each_unsafe_form():
    for line in [
        "state = torch.load(path)",
        "import pickle",
        "pickle.loads(raw)",
        "np.load(f, allow_pickle=True)",
        "yaml.load(text, Loader=yaml.Loader)",
        "values = yaml.unsafe_load(text)",
    ]:
        assert UNSAFE.search(line), line
    assert not UNSAFE.search("values = yaml.safe_load(text)") and not UNSAFE.search("load_file(path)")


# -- tampered config.json ----------------------------------------------------------------------------

JSON_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.sampled_from([0, 1, 2, 3, 7, 16, 17, 32, 10**6, 10**9, 10**18])
    | st.floats()
    | st.text(max_size=6)
    | st.lists(st.integers(), max_size=2)
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("saved")
    mosaic = MemoryMosaic(MemoryMosaicConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, pmem_size=8, block_size=8))
    gpt = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8))
    return {"mosaic": mosaic.save_pretrained(root / "mosaic"), "gpt": gpt.save_pretrained(root / "gpt")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["mosaic", "gpt"]), key=st.text(max_size=3) | st.sampled_from(
    ["model_type", "vocab_size", "n_layer", "n_head", "n_embd", "pmem_size", "pmem_count", "dropout", "bias",
     "v_shift", "value_kind", "leaky_chunk_size", "impl", "attn_only", "pre_ln"]
), value=JSON_VALUES)  # fmt: skip
def test_a_tampered_config_is_refused_cleanly(saved, tmp_path, kind, key, value):
    folder = tmp_path / kind
    shutil.copytree(saved[kind], folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model = memory_mosaics.load(folder)
    except CheckpointError:
        return
    # loaded: then every weight of the model came from the file, unchanged
    weights, state = load_file(str(folder / "model.safetensors")), model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in weights.items())


def test_absurd_sizes_are_refused_before_anything_is_allocated(saved, tmp_path):
    for field, value, message in [
        ("n_layer", 10**7, "n_layer is 10000000 but"),
        ("vocab_size", 10**12, "need at least"),
        ("n_embd", 2**40, "need at least"),
    ]:
        folder = tmp_path / field
        shutil.copytree(saved["mosaic"], folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, field: value, "n_head": 1}))
        with pytest.raises(CheckpointError, match=message):
            memory_mosaics.load(folder)


def test_a_gpt_position_table_counts_in_the_size_bound(saved, tmp_path):
    folder = tmp_path / "gpt"
    shutil.copytree(saved["gpt"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_size": 10**12}))
    with pytest.raises(CheckpointError, match="need at least"):
        memory_mosaics.load(folder)


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_the_size_bound_never_refuses_a_real_model(model_type):
    """min_param_count is a lower bound for every registered model, so honest checkpoints load."""
    cls = MODEL_TYPES[model_type]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    for n_layer, n_embd, extra in [(1, 8, {}), (3, 32, {}), (2, 16, {"pmem_count": 3}), (2, 16, {"attn_only": True})]:
        values = {"vocab_size": 40, "n_layer": n_layer, "n_embd": n_embd, "n_head": 2, "block_size": 8, **extra}
        config = cls.config_class(**{k: v for k, v in values.items() if k in fields})
        model = cls(config)
        stored = sum(t.numel() for k, t in model.state_dict().items() if k not in model.tied_parameters)
        assert min_param_count(config) <= stored, (model_type, values)
