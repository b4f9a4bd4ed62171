"""How far one bf16 training step's loss and gradients are from float64, with each compiled CPU kernel on or off.

A randomly initialised Memory Mosaic of the `tinystories-cpu` shape (4 layers, 4 heads, n_embd 256,
P 896, vocab 4096), one batch of 8 x 256 random tokens: the loss and the gradient of every weight under
bf16 autocast against the same model in float64 (operator path), for the four combinations of the
features kernel (`ops/features_cpu.py`) and the persistent-read kernel (`ops/persistent_read_cpu.py`).

    python benchmarks/bf16_gradient_error.py     # -> benchmarks/results/bf16_gradient_error.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from unittest import mock

import torch

from memory_mosaics.commands._common import check_writable
from memory_mosaics.errors import MosaicError
from memory_mosaics.models.memory_mosaic import MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.ops import features_cpu, persistent_read_cpu

RESULTS = Path(__file__).resolve().parent / "results"


def loss_and_gradient(model, tokens, bf16: bool, features: bool = True, persistent: bool = True):
    model.zero_grad()
    off = lambda *args, **kwargs: False  # noqa: E731
    with (
        mock.patch.object(features_cpu, "usable", features_cpu.usable if features else off),
        mock.patch.object(persistent_read_cpu, "usable", persistent_read_cpu.usable if persistent else off),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().double() for p in model.parameters()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(RESULTS / "bf16_gradient_error.json"), help="where to write the result")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    try:  # before the work, not after it
        check_writable(args.json, "--json")
    except MosaicError as err:
        parser.error(str(err))
    torch.manual_seed(0)
    shape = {"vocab_size": 4096, "n_layer": 4, "n_head": 4, "n_embd": 256, "pmem_size": 896, "block_size": 256}
    config = MemoryMosaicConfig(**shape, dropout=0.0)
    model = MemoryMosaic(config)
    tokens = torch.randint(0, config.vocab_size, (8, 257))
    loss64, grad64 = loss_and_gradient(copy.deepcopy(model).double(), tokens, bf16=False)
    rows = []
    for features in (True, False):
        for persistent in (True, False):
            loss, grad = loss_and_gradient(model, tokens, True, features, persistent)
            rows.append(
                {
                    "features_kernel": features,
                    "persistent_read_kernel": persistent,
                    "loss_error": abs(loss - loss64),
                    "gradient_relative_error": ((grad - grad64).norm() / grad64.norm()).item(),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    Path(args.json).write_text(json.dumps({"loss_float64": loss64, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
