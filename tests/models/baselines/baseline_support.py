"""Helpers shared by the baseline tests (a plain module: conftest files of different folders
would share one import name)."""

import torch


def assert_twins_agree(fast, reference, inputs, names, atol=1e-12, rtol=1e-10):
    """`fast(*inputs)` equals `reference(*inputs)`, and so do their gradients with respect to
    every input for the same random output gradient (float64 inputs expected)."""
    expected = reference(*inputs)
    grad_output = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, grad_output)
    got = fast(*inputs)
    got_grads = torch.autograd.grad(got, inputs, grad_output)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    for name, got_grad, expected_grad in zip(names, got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, atol=10 * atol, rtol=10 * rtol, msg=name)
