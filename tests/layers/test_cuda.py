"""The fast model on a CUDA device equals the plain reference on the CPU: logits, loss, gradients.

On CUDA the fast paths differ from the CPU's: the leaky average runs as a Triton kernel (when Triton
is installed; MOSAIC_TRITON=0 selects the torch scan), and the persistent memory reads through the
fused attention kernel. Every test skips without a CUDA device.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from memory_mosaics import MemoryMosaic, MemoryMosaicConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def tiny(impl: str, value_kind: str = "lowrank") -> MemoryMosaic:
    config = MemoryMosaicConfig(
        vocab_size=53,
        block_size=150,
        n_layer=2,
        n_head=4,
        n_embd=32,
        pmem_size=40,
        dropout=0.0,
        value_kind=value_kind,
        impl=impl,
        leaky_chunk_size=16,
    )
    torch.manual_seed(0)
    return MemoryMosaic(config)


def run(model: MemoryMosaic, idx: torch.Tensor, dtype: torch.dtype | None = None):
    """Logits, loss and every parameter's gradient (as float64 on the CPU)."""
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype is not None)
    with autocast:
        logits, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    grads = {name: p.grad.double().cpu() for name, p in model.named_parameters()}
    return logits.double().cpu(), loss.double().cpu(), grads


@pytest.mark.parametrize("triton", ["1", "0"])
@pytest.mark.parametrize("value_kind", ["lowrank", "kernel2"])
def test_fast_on_cuda_equals_cpu_reference_float64(triton, value_kind, monkeypatch):
    monkeypatch.setenv("MOSAIC_TRITON", triton)
    idx = torch.randint(0, 53, (2, 131), generator=torch.Generator().manual_seed(1))
    expected = run(tiny("reference", value_kind).double(), idx)
    got = run(tiny("fast", value_kind).double().cuda(), idx.cuda())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-10)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=0, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fast_on_cuda_float32_and_bf16_close_to_reference(dtype):
    idx = torch.randint(0, 53, (2, 131), generator=torch.Generator().manual_seed(2))
    expected = run(tiny("reference").double(), idx)
    got = run(tiny("fast").cuda(), idx.cuda(), dtype)
    loss_tolerance = 1e-4 if dtype is None else 3e-2
    assert abs(got[1].item() - expected[1].item()) < loss_tolerance * expected[1].item()
    for name, grad in expected[2].items():
        relative = (got[2][name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert relative < (1e-3 if dtype is None else 0.1), (name, relative.item())


def test_golden_vectors_on_cuda():
    """The authors' golden logits, loss and gradients (tests/models/test_golden.py), on the device, fast impl."""
    path = Path(__file__).resolve().parents[1] / "models" / "test_golden.py"
    spec = importlib.util.spec_from_file_location("golden_for_cuda", path)
    golden_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(golden_test)
    if not golden_test.GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {golden_test.GOLDEN}")
    for case in sorted(golden_test.CASES):
        model, golden, ours_to_authors = golden_test.load_case(case, "fast")
        model = model.cuda()
        logits, loss = model(golden["input_ids"].cuda(), golden["targets"].cuda())
        torch.testing.assert_close(logits.cpu(), golden["logits"], rtol=0, atol=1e-10)
        torch.testing.assert_close(loss.reshape(1).cpu(), golden["loss"].double(), rtol=0, atol=1e-10)
        loss.backward()
        for ours, param in model.named_parameters():
            expected = golden[f"grad/{ours_to_authors[ours]}"]
            if expected.dim() == 3:  # the authors' convolution kernels (C, C, taps) -> our matrices
                expected = torch.cat(list(expected.unbind(-1)), dim=0)
            torch.testing.assert_close(param.grad.cpu(), expected, rtol=0, atol=1e-8, msg=lambda m, n=ours: f"{n}: {m}")
