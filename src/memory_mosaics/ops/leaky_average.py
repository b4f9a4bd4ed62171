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


def leaky_average(
    x: Tensor, beta: Tensor, initial: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Chunked form for training: equal to `leaky_average_reference`, in O(T * chunk_size)."""
    _check(x, beta)
    length = x.shape[-2]
    if length <= chunk_size:
        return leaky_average_reference(x, beta, initial)

    n_chunks = -(-length // chunk_size)
    padded = n_chunks * chunk_size
    if padded != length:
        # Zeros appended at the end change nothing before them: the average only looks back.
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - length))
    *lead, heads, _, dim = x.shape
    chunks = x.reshape(*lead, heads, n_chunks, chunk_size, dim)

    # Inside each chunk: the dense form, as if the chunk were a sequence of its own.
    # (einsum lowers to one bmm over heads; a broadcast `@` would materialise the matrix per chunk.)
    local = torch.einsum("hij,...hnjd->...hnid", _decay_matrix(beta, chunk_size).to(x.dtype), chunks)

    # The full average at the end of chunk n is a leaky average over chunks of the chunks' own last
    # rows, with decay beta * chunk_size; recursion keeps this linear in the number of chunks.
    chunk_ends = local[..., -1, :]
    if initial is not None:
        chunk_ends = chunk_ends.clone()
        chunk_ends[..., 0, :] += torch.exp(-beta * chunk_size).to(x.dtype)[:, None] * initial
    carried = leaky_average(chunk_ends, beta * chunk_size, chunk_size=chunk_size)

    # State entering chunk n: the full average at the end of chunk n-1 (or `initial` for chunk 0).
    first = initial if initial is not None else torch.zeros_like(carried[..., :1, :]).squeeze(-2)
    entering = torch.cat([first.unsqueeze(-2), carried[..., :-1, :]], dim=-2)
    y = local + _decay_powers(beta, chunk_size, x.dtype).unsqueeze(-3) * entering.unsqueeze(-2)
    return y.reshape(*lead, heads, padded, dim)[..., :length, :]


def leaky_average_step(state: Tensor | None, x_t: Tensor, beta: Tensor) -> Tensor:
    """One step of the recurrence y_t = x_t + exp(-beta) * y_{t-1}; `x_t` and `state` are (..., H, D).

    `state=None` means no past (y_{-1} = 0). Returns the new state, which is also the output at t.
    """
    if state is None:
        return x_t
    return x_t + torch.exp(-beta).to(x_t.dtype)[:, None] * state
