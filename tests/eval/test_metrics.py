"""Loss, perplexity and loss by position agree with direct computations from the model's logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memory_mosaics.eval import evaluate_loss, per_position_loss
from memory_mosaics.eval.metrics import consecutive_windows, document_windows
from memory_mosaics.train.checkpoint import load_model


@pytest.fixture(scope="module")
def model(byte_runs):
    return load_model(byte_runs["mosaic"])


def test_loss_is_the_mean_over_every_scored_token(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=200)
    result = evaluate_loss(model, tokens, seq_len=32, batch_size=3)
    windows = torch.from_numpy(consecutive_windows(tokens, 32).astype(np.int64))
    assert windows.shape == (6, 33) and torch.equal(windows[1, 0], torch.tensor(tokens[32]))
    with torch.no_grad():
        _, expected = model(windows[:, :-1], windows[:, 1:])
    assert result.tokens == 6 * 32
    assert result.loss == pytest.approx(float(expected), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_document_windows_start_at_end_of_text_and_stop_at_the_next():
    eot = 9
    tokens = np.array([1, 2, eot, 3, 4, 5, eot, 6, eot, 7, 7, 7, 7])
    windows = document_windows(tokens, seq_len=4, eot_id=eot)
    assert windows.tolist() == [[eot, 3, 4, 5, eot], [eot, 6, eot, -1, -1], [eot, 7, 7, 7, 7]]


def test_per_position_matches_token_losses_of_each_document(model):
    eot = 256
    docs = [list(b"hello there"), list(b"a much longer story, it goes on and on and on")]
    tokens = np.array(docs[0] + [eot] + docs[1] + [eot])
    curve = per_position_loss(model, tokens, seq_len=32, eot_id=eot, batch_size=1)
    assert curve.mode == "documents"
    # the first document gets a marker put before it; each document is scored up to its closing marker
    assert curve.counts[0] == 2 and curve.counts[len(docs[0])] == 2 and curve.counts[len(docs[0]) + 1] == 1
    x = torch.tensor([[eot, *docs[0]]])
    y = torch.tensor([[*docs[0], eot]])
    with torch.no_grad():
        first = F.cross_entropy(model(x)[0][0], y[0], reduction="none")
    x2 = torch.tensor([[eot, *docs[1][:31]]])
    with torch.no_grad():
        second = F.cross_entropy(model(x2)[0][0], torch.tensor(docs[1][:32]), reduction="none")
    assert curve.losses[3] == pytest.approx(float(first[3] + second[3]) / 2, rel=1e-5)
    assert curve.losses[20] == pytest.approx(float(second[20]), rel=1e-5)


def test_per_position_without_documents_uses_consecutive_windows(model):
    tokens = np.random.default_rng(1).integers(0, 256, size=100)
    curve = per_position_loss(model, tokens, seq_len=16, eot_id=None)
    assert curve.mode == "windows" and curve.counts == [6] * 16
    assert all(v is not None and v > 0 for v in curve.losses)
