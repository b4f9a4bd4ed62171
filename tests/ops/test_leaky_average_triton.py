"""The Triton leaky-average kernel equals the dense reference, outputs and gradients.

Without a GPU the kernel runs through Triton's interpreter (CPU tensors), which Triton selects when
TRITON_INTERPRET=1 is set before it is imported: `test_interpreter` runs the `interpreted` tests of
this file in a fresh pytest process with the variable set (they skip in an ordinary run). On CUDA
machines the kernel runs as `leaky_average` uses it. All skip with a reason when Triton is absent.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memory_mosaics.ops import leaky_average, leaky_average_reference

leaky_module = importlib.import_module("memory_mosaics.ops.leaky_average")  # the module, not the function

triton = pytest.importorskip("triton", reason="triton not installed (optional; the GPU path of the leaky average)")

DECAYS = [0.01, 0.3, 3.0, 40.0]  # one head per decay; 40: exp(-beta * t) underflows within a chunk


INSIDE_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def test_interpreter():
    """Run this file's `interpreted` tests in a pytest process where Triton interprets kernels."""
    if INSIDE_INTERPRETER:
        pytest.skip("already inside the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-k", "interpreted", __file__]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2], check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout, done.stdout[-3000:]  # 3 lengths + the autograd test


@pytest.fixture(scope="module")
def interpreted():
    """leaky_average_triton with its kernel run by Triton's interpreter on CPU tensors."""
    if not INSIDE_INTERPRETER:
        pytest.skip("runs inside test_interpreter's process (TRITON_INTERPRET=1)")
    from memory_mosaics.ops import leaky_average_triton

    return leaky_average_triton


def head_split_input(batch: int, length: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """(B, H, T, d) as a view of a (B, T, H*d) linear output, the layout the model passes in."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randn(batch, length, len(DECAYS) * dim, generator=generator, dtype=torch.float64).to(dtype)
    return flat.view(batch, length, len(DECAYS), dim).transpose(1, 2)


CHUNK = 16  # the interpreter's time grows with the padded length: small chunks keep the tests fast


@pytest.mark.parametrize("length", [1, 16, 40])
def test_interpreted_scans_match_reference(interpreted, length):
    x = head_split_input(2, length, 3, torch.float64)
    beta = torch.tensor(DECAYS, dtype=torch.float64)
    initial = torch.randn(2, len(DECAYS), 3, dtype=torch.float64)
    forward = interpreted.scan(x, beta, initial=initial, chunk=CHUNK)
    torch.testing.assert_close(forward, leaky_average_reference(x, beta, initial), rtol=1e-12, atol=1e-12)
    backward = interpreted.scan(x, beta, reverse=True, chunk=CHUNK)
    expected = leaky_average_reference(x.flip(-2), beta).flip(-2)  # the transpose: the scan backwards in time
    torch.testing.assert_close(backward, expected, rtol=1e-12, atol=1e-12)
    # float32 inputs: sums in float32, output in float32.
    got32 = interpreted.scan(x.float(), beta.float(), chunk=CHUNK)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, leaky_average_reference(x, beta).float(), rtol=1e-5, atol=1e-4)


def test_interpreted_kernel_inside_autograd(interpreted, monkeypatch):
    """`LeakyAverage` with the kernel as its scan: gradients of x, beta and the initial state."""
    monkeypatch.setattr(
        leaky_module,
        "_scan_on_device",
        lambda x, beta, chunk, reverse=False, initial=None: interpreted.scan(x, beta, reverse, initial, CHUNK),
    )
    x = head_split_input(2, 40, 3, torch.float64, seed=1).requires_grad_()
    beta = torch.tensor(DECAYS, dtype=torch.float64, requires_grad=True)
    initial = torch.randn(2, len(DECAYS), 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, len(DECAYS), 40, 3, dtype=torch.float64)

    def grads(fn):
        x.grad = beta.grad = initial.grad = None
        out = fn(x, beta, initial)
        (out * weights).sum().backward()
        return out.detach(), x.grad.clone(), beta.grad.clone(), initial.grad.clone()

    fast = grads(leaky_average)
    reference = grads(leaky_average_reference)
    for got, expected in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_leaky_average_uses_kernel_and_matches_reference(dtype, monkeypatch):
    from memory_mosaics.ops import leaky_average_triton

    monkeypatch.delenv("MOSAIC_TRITON", raising=False)
    calls = []
    original = leaky_average_triton.scan
    monkeypatch.setattr(leaky_average_triton, "scan", lambda *a, **k: calls.append(k) or original(*a, **k))
    x64 = head_split_input(3, 1000, 64, torch.float64, seed=2)
    beta64 = torch.tensor(DECAYS, dtype=torch.float64)
    weights = torch.randn(3, len(DECAYS), 1000, 64, dtype=torch.float64)
    x = x64.to("cuda", dtype).requires_grad_()
    beta = beta64.to("cuda", dtype).requires_grad_()
    (leaky_average(x, beta) * weights.to("cuda", dtype)).sum().backward()
    assert [call["reverse"] for call in calls] == [False, True]  # forward and backward scans both ran the kernel

    x_ref, beta_ref = x64.clone().requires_grad_(), beta64.clone().requires_grad_()
    expected = leaky_average_reference(x_ref, beta_ref)
    (expected * weights).sum().backward()
    got = leaky_average(x.detach(), beta.detach()).double().cpu()
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    scale = expected.abs().amax().item()
    assert (got - expected.detach()).abs().max().item() <= tolerance * scale
    assert (x.grad.double().cpu() - x_ref.grad).abs().max().item() <= tolerance * x_ref.grad.abs().amax().item()
    beta_scale = beta_ref.grad.abs().amax().item()
    # bf16 dL/dbeta is a sum over 190k bf16 products: loose, relative to the largest head.
    beta_tolerance = {torch.float64: 1e-10, torch.float32: 1e-3, torch.bfloat16: 0.1}[dtype]
    assert (beta.grad.double().cpu() - beta_ref.grad).abs().max().item() <= beta_tolerance * beta_scale
