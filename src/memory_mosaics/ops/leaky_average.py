"""The leaky average: an exponentially decaying sum over the past, one decay per head.

    y_t = sum_{s <= t} exp(-beta_h * (t - s)) * x_s        (the current step included, weight 1)
        = x_t + exp(-beta_h) * y_{t-1}

The authors' three implementations scale this sum by different positive numbers per (t, head): the
plain sum (nanoMosaics), times (1 - e^-beta) (Library), or divided by the sum of the weights (the CUDA
kernel). Every caller L2-normalises the result per head, so all three are the same function; we use
the plain sum because it stays well defined when beta reaches 0.

Three forms, which must agree:
- `leaky_average_reference`: the dense T x T form of the paper's code. O(T^2) time and memory.
- `leaky_average`: the training form. Dense inside chunks of `chunk_size` steps; the state carried
  from chunk to chunk is itself a leaky average over the chunk index (decay beta * chunk_size), which is
  computed by the same function, so the cost is O(T * chunk_size) and no T x T tensor is ever built.
  Its backward pass is written by hand (`LeakyAverage`): the gradient with respect to x is the same
  scan run backwards in time, and the gradient with respect to beta is one dot product (see there),
  so autograd never records the chunking's dozen small operations. On CUDA tensors both scans run
  as a Triton kernel when Triton is installed (`leaky_average_triton`).
- `leaky_average_step`: one step of the recurrence, for generation.

Shapes: `x` is (..., H, T, D) and `beta` is (H,), non-negative. An optional `initial` state of shape
(..., H, D) is the value of y_{-1}: the sum over steps before this sequence began (for chunked prefill).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 32  # measured on CPU: fp32 fastest at 16-32, bf16 flat from 16 to 128


def _decay_matrix(beta: Tensor, length: int) -> Tensor:
    """(H, length, length) lower-triangular matrix with entries exp(-beta_h * (t - s)) for s <= t."""
    steps = torch.arange(length, device=beta.device)
    lag = (steps[:, None] - steps[None, :]).to(beta.dtype)
    causal = lag >= 0
    # Clamp before exp so the masked (future) entries never overflow: an inf there would turn the
    # gradient with respect to beta into NaN even though the entry is multiplied by zero.
    weights = torch.exp(-beta[:, None, None] * lag.clamp(min=0))
    return weights * causal


def _decay_powers(beta: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """(H, length, 1): exp(-beta_h * (t + 1)) for t = 0..length-1, the weight of the carried state."""
    steps = torch.arange(1, length + 1, device=beta.device, dtype=beta.dtype)
    return torch.exp(-beta[:, None] * steps).to(dtype).unsqueeze(-1)


def _check(x: Tensor, beta: Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"x must have shape (..., H, T, D), got {tuple(x.shape)}")
    if beta.shape != (x.shape[-3],):
        raise ValueError(f"beta must have shape (H,) = ({x.shape[-3]},), got {tuple(beta.shape)}")


def leaky_average_reference(x: Tensor, beta: Tensor, initial: Tensor | None = None) -> Tensor:
    """Dense T x T form, as in the paper's code. The plain twin that every fast form is tested against."""
    _check(x, beta)
    length = x.shape[-2]
    y = _decay_matrix(beta, length).to(x.dtype) @ x
    if initial is not None:
        y = y + _decay_powers(beta, length, x.dtype) * initial.unsqueeze(-2)
    return y


def _scan(x: Tensor, beta: Tensor, chunk_size: int, reverse: bool = False, initial: Tensor | None = None) -> Tensor:
    """The chunked scan without autograd. Returns (..., H, T, D), stored head-major: (H, ..., T, D).

    Forward in time (reverse=False): y_t = sum_{s <= t} a^(t-s) x_s + a^(t+1) initial, a = exp(-beta).
    Backward in time (reverse=True):  y_s = sum_{t >= s} a^(t-s) x_t   (the transpose; no initial).

    Head-major storage lets each head's chunks be one batched product with no copy when x comes from
    a linear layer's output split into heads (rows of stride C): (B, T, d) -> (B * n_chunks, chunk, d).
    """
    *lead, heads, length, dim = x.shape
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk
    if padded != length:
        # Zeros appended at the end change nothing before them in either direction: the forward
        # scan only looks back, and the backward scan adds them with weight zero.
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - length))
    weights = _decay_matrix(beta, chunk).to(x.dtype)  # inside a chunk: the dense form
    if reverse:
        weights = weights.transpose(-1, -2)
    y = x.new_empty(heads, *lead, padded, dim)
    for head in range(heads):
        rows = x[..., head, :, :].reshape(-1, chunk, dim)  # a view for a split linear output
        torch.matmul(weights[head], rows, out=y[head].view(-1, chunk, dim))
    if n_chunks == 1 and initial is None:
        return y.movedim(0, -3)[..., :length, :]

    # What crosses a chunk border: forward, the last row of each chunk (its whole sum decayed to the
    # chunk's end); backward, the first row. Between chunks the decay is a^chunk, so the state
    # entering each chunk is itself a leaky average over the chunk index, computed by recursion.
    blocks = y.view(heads, -1, n_chunks, chunk, dim)
    if reverse:
        starts = blocks[:, :, 1:, 0, :]
        incoming = torch.cat([starts, torch.zeros_like(starts[:, :, :1])], dim=2)
    else:
        first = initial.to(x.dtype).movedim(-2, 0).reshape(heads, -1, 1, dim) if initial is not None else None
        ends = blocks[:, :, :-1, -1, :]
        incoming = torch.cat([first if first is not None else torch.zeros_like(ends[:, :, :1]), ends], dim=2)
    entering = _scan(incoming.transpose(0, 1), beta * chunk, chunk_size, reverse)  # (batch, H, N, D)
    powers = _decay_powers(beta, chunk, x.dtype)  # a^(i+1): weight of the state at row i
    if reverse:
        powers = powers.flip(-2)  # a^(chunk - i): rows further from the next chunk decay more
    entering = entering.transpose(0, 1).reshape(heads, -1, 1, dim)
    for head in range(heads):
        block = y[head].view(-1, chunk, dim)
        block.baddbmm_(powers[head].expand(block.shape[0], chunk, 1), entering[head])
    return y.movedim(0, -3)[..., :length, :]


def _scan_on_device(
    x: Tensor, beta: Tensor, chunk_size: int, reverse: bool = False, initial: Tensor | None = None
) -> Tensor:
    """`_scan`, or on CUDA tensors the Triton kernel when Triton is installed (leaky_average_triton)."""
    if x.is_cuda:
        from memory_mosaics.ops import leaky_average_triton  # deferred: importing Triton takes a while

        if leaky_average_triton.enabled_for(x):
            return leaky_average_triton.scan(x, beta, reverse=reverse, initial=initial)
    return _scan(x, beta, chunk_size, reverse=reverse, initial=initial)


class LeakyAverage(torch.autograd.Function):
    """The chunked scan with a hand-written backward pass.

    With G = dL/dx (the scan of the output gradient run backwards in time),
        dL/dbeta_h  = -exp(-beta_h) * sum_t <G_t, y_{t-1}>          (y_{-1} = initial, or 0)
        dL/dinitial = exp(-beta_h) * G_0
    because d y_t / d beta = -sum_{s<t} (t-s) a^(t-s) x_s, and the lag-weighted sum regroups into a
    double leaky sum: sum_{s<t} (t-s) a^(t-s) x_s = sum_{u<t} a^(t-u) y_u.
    """

    @staticmethod
    def forward(ctx, x: Tensor, beta: Tensor, initial: Tensor | None, chunk_size: int) -> Tensor:
        beta = beta.detach()
        y = _scan_on_device(x.detach(), beta, chunk_size, initial=None if initial is None else initial.detach())
        ctx.save_for_backward(y, beta, initial)
        ctx.chunk_size = chunk_size
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, beta, initial = ctx.saved_tensors
        grad_x = _scan_on_device(grad, beta, ctx.chunk_size, reverse=True)
        grad_beta = grad_initial = None
        if ctx.needs_input_grad[1]:
            # (Reductions of bf16 tensors accumulate in float32; only the result is rounded.)
            acc = torch.promote_types(grad_x.dtype, torch.float32)
            lead = tuple(range(grad_x.dim() - 3))
            dots = (grad_x[..., 1:, :] * y[..., :-1, :]).sum(dim=(*lead, -2, -1)).to(acc)
            if initial is not None:
                dots = dots + (grad_x[..., 0, :] * initial.to(grad_x.dtype)).sum(dim=(*lead, -1)).to(acc)
            grad_beta = (-torch.exp(-beta.to(acc)) * dots).to(beta.dtype)
        if initial is not None and ctx.needs_input_grad[2]:
            grad_initial = (torch.exp(-beta).to(grad_x.dtype)[:, None] * grad_x[..., 0, :]).to(initial.dtype)
        return grad_x, grad_beta, grad_initial, None


def leaky_average(
    x: Tensor, beta: Tensor, initial: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Chunked form for training: equal to `leaky_average_reference`, in O(T * chunk_size)."""
    _check(x, beta)
    return LeakyAverage.apply(x, beta, initial, chunk_size)


def leaky_average_step(state: Tensor | None, x_t: Tensor, beta: Tensor) -> Tensor:
    """One step of the recurrence y_t = x_t + exp(-beta) * y_{t-1}; `x_t` and `state` are (..., H, D).

    `state=None` means no past (y_{-1} = 0). Returns the new state, which is also the output at t.
    """
    if state is None:
        return x_t
    return x_t + torch.exp(-beta).to(x_t.dtype)[:, None] * state
