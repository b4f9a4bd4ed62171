"""Loss, perplexity and loss by position on a token stream, for any model of the project.

`evaluate_loss` cuts the stream into consecutive windows of `seq_len + 1` tokens and averages the
next-token loss over every predicted token, so each token is scored once and every context length
from 1 to seq_len is equally represented (the same expectation as training's random windows).

`per_position_loss` answers "how much better does the model predict as it reads further into a
document" (the paper's Figure 8). When the stream holds end-of-text tokens, each window starts at
one of them, so position 0 is the first token of a document; otherwise the consecutive windows are
used. Tokens after the document's own end are not scored.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memory_mosaics.errors import MosaicError


@dataclass
class LossResult:
    loss: float
    perplexity: float
    tokens: int  # predicted tokens that were scored
    seq_len: int


@dataclass
class PerPositionResult:
    mode: str  # "documents" or "windows"
    losses: list[float | None]  # mean loss at each position (None where nothing was scored)
    counts: list[int] = field(default_factory=list)  # how many tokens were scored at each position


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


@torch.no_grad()
def token_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """Per-token cross-entropy (B, T) in float32; targets equal to -1 give 0."""
    with _autocast(x.device, dtype):
        logits, _ = model(x)
    losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    return losses.view_as(y)


def _batches(windows: np.ndarray, batch_size: int, device: torch.device, progress: str | None = None):
    """Batches of (inputs, targets); `progress` names a progress bar on stderr (None: no bar)."""
    from tqdm.auto import tqdm

    starts = range(0, len(windows), batch_size)
    for i in tqdm(starts, desc=progress, unit="batch", file=sys.stderr, disable=progress is None, leave=False):
        rows = torch.from_numpy(windows[i : i + batch_size].astype(np.int64)).to(device)
        yield rows[:, :-1], rows[:, 1:]


def consecutive_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens (consecutive windows share their boundary token)."""
    count = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    starts = np.arange(count) * seq_len
    return np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]) if count else np.empty((0, seq_len + 1))


def fit_seq_len(num_tokens: int, seq_len: int, what: str) -> int:
    """A text shorter than one window is evaluated as one shorter window; fewer than 2 tokens is an error."""
    if num_tokens < 2:
        raise MosaicError(f"{what} has {num_tokens} token(s); at least 2 are needed to score a prediction")
    return min(seq_len, num_tokens - 1)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int = 8,
    dtype: str = "float32",
    max_windows: int | None = None,
    progress: bool = False,
) -> LossResult:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    windows = consecutive_windows(tokens, seq_len, max_windows)
    for x, y in _batches(windows, batch_size, device, "loss" if progress else None):
        losses = token_losses(model, x, y, dtype)
        total, count = total + float(losses.double().sum()), count + losses.numel()
    model.train(was_training)
    if count == 0:
        raise MosaicError(f"{len(tokens)} tokens are fewer than one window of {seq_len} + 1; use a shorter --seq-len")
    loss = total / count
    return LossResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count, seq_len=seq_len)


def document_windows(tokens: np.ndarray, seq_len: int, eot_id: int, max_docs: int | None = None) -> np.ndarray:
    """One window per document, starting at the end-of-text token before it; -1 after the document ends.

    Column 0 is the end-of-text token, so position p scores the (p+1)-th token of the document, the
    document's closing end-of-text included.
    """
    eots = np.flatnonzero(np.asarray(tokens) == eot_id)
    eots = eots[eots < len(tokens) - 1]  # a document needs at least one token after its marker
    if max_docs is not None:
        eots = eots[:max_docs]
    windows = np.full((len(eots), seq_len + 1), -1, dtype=np.int64)
    for row, start in enumerate(eots):
        window = np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)
        following = np.flatnonzero(window[1:] == eot_id)
        length = following[0] + 2 if len(following) else len(window)  # keep the closing marker
        windows[row, :length] = window[:length]
    return windows


@torch.no_grad()
def per_position_loss(
    model: nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    eot_id: int | None,
    batch_size: int = 8,
    dtype: str = "float32",
    max_windows: int | None = None,
    progress: bool = False,
) -> PerPositionResult:
    device = next(model.parameters()).device
    if eot_id is not None and len(tokens) and tokens[0] != eot_id:
        tokens = np.concatenate([[eot_id], np.asarray(tokens)])  # the first document has no marker before it
    docs = document_windows(tokens, seq_len, eot_id, max_windows) if eot_id is not None else np.empty((0,))
    mode = "documents" if len(docs) else "windows"
    windows = docs if len(docs) else consecutive_windows(tokens, seq_len, max_windows)
    sums = torch.zeros(seq_len, dtype=torch.float64)
    counts = torch.zeros(seq_len, dtype=torch.int64)
    was_training = model.training
    model.eval()
    for x, y in _batches(windows, batch_size, device, "loss by position" if progress else None):
        scored = y != -1
        x = x.clamp_min(0)  # padding after a document's end is never scored; any id will do
        losses = token_losses(model, x, y, dtype)
        sums += (losses * scored).double().sum(0).cpu()
        counts += scored.sum(0).cpu()
    model.train(was_training)
    means = [float(s / c) if c else None for s, c in zip(sums.tolist(), counts.tolist(), strict=True)]
    return PerPositionResult(mode=mode, losses=means, counts=counts.tolist())
