"""Pin the model to the authors' implementation: logits, loss and gradients for fixed weights.

The golden files (../shared/reference/golden) were produced by the authors' Library code in float64;
see their README. Our parameter names differ; `authors_to_ours` is the mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memory_mosaics import MemoryMosaic, MemoryMosaicConfig

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "golden"
CASES = {"mm_lowrank_value": "lowrank", "mm_kernel2_value": "kernel2"}

pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden vectors not found at {GOLDEN}")


def authors_to_ours(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Map one of the authors' parameters to our name and layout."""
    if name == "emb.weight":
        return "wte.weight", value
    if name == "ln_out.weight":
        return "ln_f.weight", value
    layer, rest = name.split(".", 2)[1], name.split(".", 2)[2]
    prefix = f"blocks.{layer}."
    unit, _, leaf = rest.partition(".")
    if unit in ("ln1", "ln2"):
        return prefix + {"ln1": "ln_1", "ln2": "ln_2"}[unit] + "." + leaf, value
    ours = prefix + ("context." if unit == "attn" else "persistent.")
    simple = {
        "leaky_key_beta": "key.leak",
        "kernel_beta": "key.bandwidth",
        "value_beta": "value.value_scale" if unit == "attn" else "out_scale",
        "c_proj.weight": "c_proj.weight",
        "k_featurizer.conv.weight": "key.proj.weight",
        "v_featurizer.coef": "value.mix",
        "v_featurizer.linear.weight": "value.proj.weight",
        "pmem.M_k0": "memory_keys",
        "pmem.M_v0": "memory_values",
    }
    if leaf in simple:
        if leaf == "k_featurizer.conv.weight":
            value = value[:, :, 0]
        return ours + simple[leaf], value
    if leaf == "v_featurizer.conv.weight":  # (C, C, 2): tap 0 on x_t, tap 1 on x_{t+1}
        return ours + "value.proj.weight", torch.cat([value[:, :, 0], value[:, :, 1]], dim=0)
    raise KeyError(name)


def load_case(case: str, impl: str):
    from safetensors.torch import load_file

    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    tensors = load_file(str(GOLDEN / f"{case}.safetensors"))
    config = MemoryMosaicConfig(
        vocab_size=meta["vocab_size"],
        block_size=meta["block_size"],
        n_layer=meta["n_layer"],
        n_head=meta["n_head"],
        n_embd=meta["n_embd"],
        pmem_size=meta["pmem_size"],
        pmem_count=meta["pmem_count"],
        bias=meta["bias"],
        v_shift=meta["v_shift"],
        value_kind=CASES[case],
        dropout=0.0,
        impl=impl,
        leaky_chunk_size=8,  # smaller than T=24, so the chunked scan (with a ragged tail) is exercised
    )
    model = MemoryMosaic(config).double().eval()
    ours_to_authors = {}
    state = {}
    for key, value in tensors.items():
        if key.startswith("param/"):
            ours, mapped = authors_to_ours(key[len("param/") :], value)
            state[ours] = mapped
            ours_to_authors[ours] = key[len("param/") :]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    return model, tensors, ours_to_authors


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_authors_logits_loss_and_gradients(case, impl):
    model, golden, ours_to_authors = load_case(case, impl)
    logits, loss = model(golden["input_ids"], golden["targets"])
    torch.testing.assert_close(logits, golden["logits"], rtol=0, atol=1e-10)
    torch.testing.assert_close(loss.reshape(1), golden["loss"].double(), rtol=0, atol=1e-10)
    loss.backward()
    for ours, param in model.named_parameters():
        expected = golden[f"grad/{ours_to_authors[ours]}"]
        got = param.grad
        if expected.dim() == 3 and expected.shape[-1] == 1:  # key conv (C, C, 1)
            expected = expected[:, :, 0]
        elif expected.dim() == 3 and expected.shape[-1] == 2:  # value conv (C, C, 2)
            expected = torch.cat([expected[:, :, 0], expected[:, :, 1]], dim=0)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-8, msg=lambda m, n=ours: f"{n}: {m}")
