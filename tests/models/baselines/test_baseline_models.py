"""The model contract for every baseline: shapes, causality, gradients, the loss's -1 targets,
and, where a family has several forms of its sequence mixer, identical logits across forms."""

import pytest
import torch
import torch.nn.functional as F

from memory_mosaics.models.base import load
from memory_mosaics.models.baselines import BASELINE_NAMES, build_baseline

VOCAB = 11
# Tiny but not degenerate: 2 layers, chunk sizes that do not divide the test lengths.
TINY = {
    "lstm": {"n_embd": 16},
    "gru": {"n_embd": 16},
    "mamba": {"n_embd": 16, "d_state": 4, "chunk_size": 4},
    "gla": {"n_embd": 16, "n_head": 2, "chunk_size": 4, "gate_rank": 4},
    "s4d": {"n_embd": 16, "d_state": 8},
}
# The alternative forms of each mixer, all of which must give the same logits.
FORMS = {
    "mamba": [{"scan": "sequential"}, {"scan": "chunked"}],
    "gla": [{"form": "recurrent"}, {"form": "chunked"}],
    "s4d": [{"form": "fft"}, {"form": "direct"}, {"form": "recurrent"}],
}


def tiny_model(name, **overrides):
    torch.manual_seed(0)
    model = build_baseline(name, VOCAB, 64, **{**TINY[name], **overrides})
    return model.eval()


@pytest.mark.parametrize("name", BASELINE_NAMES)
@pytest.mark.parametrize("T", [1, 7, 13])
def test_shapes_and_loss_presence(name, T):
    model = tiny_model(name)
    idx = torch.randint(0, VOCAB, (3, T))
    logits, loss = model(idx)
    assert logits.shape == (3, T, VOCAB)
    assert loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_causal(name):
    """Changing the tokens after position t changes no logit at or before t, and does change
    the logits after it (so the check can fail)."""
    model = tiny_model(name).double()
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 13))
    t = 6
    changed = idx.clone()
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1 + torch.randint(0, VOCAB - 1, (2, 6))) % VOCAB
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-10, rtol=0)
    assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-4


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_backward_gives_finite_gradients_to_every_parameter(name):
    model = tiny_model(name, dropout=0.1).train()
    idx = torch.randint(0, VOCAB, (2, 9))
    _, loss = model(idx, torch.roll(idx, -1, dims=1))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    total = sum(p.grad.abs().sum() for p in model.parameters())
    assert total > 0


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_loss_ignores_minus_one_targets(name):
    model = tiny_model(name)
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, 10))
    targets = torch.randint(0, VOCAB, (2, 10))
    targets[0, :4] = -1
    targets[1, 7:] = -1
    logits, loss = model(idx, targets)
    kept = targets != -1
    expected = F.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(loss, expected)
    # What the ignored positions hold cannot matter.
    other = targets.clone()
    other[~kept] = -1
    assert torch.equal(model(idx, other)[1], loss)


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_untied_head_has_its_own_weights(name):
    tied = tiny_model(name)
    untied = tiny_model(name, tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    extra = VOCAB * TINY[name]["n_embd"]
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + extra


@pytest.mark.parametrize("name", sorted(FORMS))
def test_every_form_of_the_mixer_gives_the_same_logits_and_gradients(name):
    reference_form, *other_forms = FORMS[name]
    reference = tiny_model(name, **reference_form).double()
    idx = torch.randint(0, VOCAB, (2, 11))
    logits, loss = reference(idx, idx)
    loss.backward()
    for form in other_forms:
        model = tiny_model(name, **form).double()
        model.load_state_dict(reference.state_dict())
        other_logits, other_loss = model(idx, idx)
        other_loss.backward()
        torch.testing.assert_close(other_logits, logits, atol=1e-9, rtol=1e-9)
        for (param_name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-9, rtol=1e-7, msg=param_name)


@pytest.mark.parametrize("name", ["mamba", "gla", "s4d"])
def test_bfloat16_autocast_runs_and_stays_close(name):
    model = tiny_model(name)
    idx = torch.randint(0, VOCAB, (2, 9))
    logits, _ = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, loss = model(idx, idx)
    assert torch.isfinite(loss)
    torch.testing.assert_close(low.float(), logits, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", BASELINE_NAMES)
@pytest.mark.parametrize("tie_weights", [True, False])
def test_save_and_load_round_trip(name, tie_weights, tmp_path):
    model = tiny_model(name, tie_weights=tie_weights)
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.wte.weight) == tie_weights
    idx = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
