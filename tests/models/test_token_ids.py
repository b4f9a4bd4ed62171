"""Token ids the embedding cannot look up give a typed error from both models, not torch's IndexError."""

import pytest
import torch

from memory_mosaics import GPT, MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.errors import MosaicError
from memory_mosaics.models.gpt import GPTConfig

SHAPE = dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)


@pytest.fixture(params=["mosaic", "gpt"])
def model(request):
    torch.manual_seed(0)
    if request.param == "mosaic":
        return MemoryMosaic(MemoryMosaicConfig(**SHAPE, pmem_size=4))
    return GPT(GPTConfig(**SHAPE))


@pytest.mark.parametrize(
    ("idx", "message"),
    [
        (torch.tensor([[1, 11]]), r"\[0, 11\).*\[1, 11\]"),
        (torch.tensor([[-1, 3]]), r"\[0, 11\).*\[-1, 3\]"),
        (torch.zeros(1, 3), "integer tensor"),
    ],
)
def test_bad_token_ids_raise_mosaic_error(model, idx, message):
    with pytest.raises(MosaicError, match=message):
        model(idx)


def test_the_largest_valid_id_passes(model):
    logits, _ = model(torch.tensor([[0, 10]]))
    assert logits.shape == (1, 2, 11)
