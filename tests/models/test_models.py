"""Both language models: contracts, causality, parameter parity, saving and loading, learning."""

from __future__ import annotations

import json

import pytest
import torch

import memory_mosaics
from memory_mosaics import GPT, GPTConfig, MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.errors import CheckpointError, ConfigError, MosaicError

TINY = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def tiny_mosaic(**overrides) -> MemoryMosaic:
    torch.manual_seed(0)
    return MemoryMosaic(MemoryMosaicConfig(**{**TINY, "pmem_size": 56, **overrides}))


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


BUILDERS = {"mosaic": tiny_mosaic, "gpt": tiny_gpt}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_forward_contract(kind):
    model = BUILDERS[kind]()
    idx = torch.randint(0, 37, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 37) and loss is None
    targets = torch.randint(0, 37, (3, 16))
    targets[:, :5] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 37), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("value_kind", ["lowrank", "kernel2"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_causality(kind, value_kind):
    """Changing tokens after t changes no logit at or before t (the look-ahead values notwithstanding)."""
    model = (tiny_mosaic(value_kind=value_kind) if kind == "mosaic" else tiny_gpt()).eval()
    idx = torch.randint(0, 37, (2, 16))
    base, _ = model(idx)
    for t in range(15):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.randint(0, 36, (2, 15 - t))) % 37
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(logits[:, t + 1 :], base[:, t + 1 :])


def test_mosaic_first_position_sees_only_its_token():
    """At position 0 the context memory reads nothing: the logits depend on the first token alone."""
    model = tiny_mosaic().eval()
    a = torch.tensor([[5, 1, 2, 3]])
    b = torch.tensor([[5, 9, 9, 9, 4, 4]])
    torch.testing.assert_close(model(a)[0][:, 0], model(b)[0][:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_embd,n_head,n_layer", [(64, 4, 2), (128, 8, 4), (768, 12, 1)])
def test_parameter_parity_with_gpt(n_embd, n_head, n_layer):
    shape = dict(vocab_size=100, block_size=32, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    mosaic = MemoryMosaic(MemoryMosaicConfig(**shape, pmem_size=int(3.5 * n_embd)))
    gpt = GPT(GPTConfig(**shape))
    ratio = mosaic.num_params(non_embedding=True) / gpt.num_params(non_embedding=True)
    assert abs(ratio - 1) < 0.005, ratio
    assert gpt.num_params(non_embedding=False) - gpt.num_params() == 100 * n_embd + 32 * n_embd


def test_authors_parameter_count_at_gpt2_small():
    """Spec §2: the 12-layer, 768-wide, vocab 50304 Memory Mosaic has 123,588,336 parameters."""
    config = MemoryMosaicConfig(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, pmem_size=2688)
    with torch.device("meta"):
        model = MemoryMosaic(config)
    assert model.num_params(non_embedding=False) == 123_588_336
    # The spec's 84,954,096 leaves out the final LayerNorm too; ours counts everything but the table.
    assert model.num_params(non_embedding=True) == 123_588_336 - 50304 * 768


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_save_and_load_give_identical_logits(kind, tmp_path):
    model = BUILDERS[kind]().eval()
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == model.model_type
    idx = torch.randint(0, 37, (2, 16))
    for loaded in (type(model).from_pretrained(tmp_path / "m"), memory_mosaics.load(tmp_path / "m")):
        assert type(loaded) is type(model)
        assert loaded.lm_head.weight is loaded.wte.weight
        assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])


def test_loading_refuses_disagreeing_or_corrupt_files(tmp_path):
    tiny_mosaic().save_pretrained(tmp_path / "m")
    config_path, weights_path = tmp_path / "m" / "config.json", tmp_path / "m" / "model.safetensors"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "n_embd": 32}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*wrong shape"):
        memory_mosaics.load(tmp_path / "m")
    config_path.write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing blocks\.2"):
        memory_mosaics.load(tmp_path / "m")
    config_path.write_text(json.dumps({**config, "attn_only": True}))
    with pytest.raises(CheckpointError, match="unexpected"):
        memory_mosaics.load(tmp_path / "m")
    config_path.write_text(json.dumps({**config, "n_head": 3}))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid config.*divisible"):
        memory_mosaics.load(tmp_path / "m")
    config_path.write_text(json.dumps({**config, "model_type": "gpt"}))
    with pytest.raises(CheckpointError, match="config.json: invalid config.*unknown field"):
        memory_mosaics.load(tmp_path / "m")
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        memory_mosaics.load(tmp_path / "m")
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="loads 'gpt'"):
        GPT.from_pretrained(tmp_path / "m")

    weights_path.write_bytes(weights_path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        memory_mosaics.load(tmp_path / "m")
    weights_path.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        memory_mosaics.load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a model folder"):
        memory_mosaics.load(tmp_path / "absent")


def test_a_pickle_named_like_weights_is_refused_not_executed(tmp_path):
    import pickle

    tiny_mosaic().save_pretrained(tmp_path / "m")
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (marker.touch, ())

    (tmp_path / "m" / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError):
        memory_mosaics.load(tmp_path / "m")
    assert not marker.exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be divisible by n_head \(4\)"),
        (dict(n_layer=0), "n_layer must be >= 1"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
        (dict(vocab_size="12"), "vocab_size must be int"),
        (dict(value_kind="conv3"), "value_kind must be one of lowrank, kernel2"),
        (dict(impl="cuda"), "impl must be one of fast, reference"),
        (dict(pmem_size=-1), "pmem_size must be >= 1"),
        (dict(bias=1), "bias must be bool"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        MemoryMosaicConfig(**overrides)
    if "n_embd" in overrides or "n_layer" in overrides or "dropout" in overrides:
        with pytest.raises(ValueError, match=message):
            GPTConfig(**overrides)


def test_config_round_trip_and_unknown_fields():
    config = MemoryMosaicConfig(n_layer=3, dropout=0)
    assert isinstance(config.dropout, float)
    assert MemoryMosaicConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown field.*n_layers"):
        MemoryMosaicConfig.from_dict({"n_layers": 3})


def test_gpt_refuses_sequences_longer_than_its_positions():
    with pytest.raises(MosaicError, match="block_size"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))
    logits, _ = tiny_mosaic()(torch.zeros(1, 40, dtype=torch.long))  # no position table: any length
    assert logits.shape == (1, 40, 37)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_tiny_model_overfits_a_fixed_batch(kind):
    model = BUILDERS[kind]()
    torch.manual_seed(1)
    idx = torch.randint(0, 37, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3, loss.item()


def test_dropout_is_active_only_in_training():
    model = tiny_mosaic(dropout=0.5)
    idx = torch.randint(0, 37, (2, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
