"""`mosaic demo`: a small Memory Mosaic learns an in-context copy task on CPU, with no data to download.

Each sequence is a random string of symbols followed by a separator and the same string again. The
second half can only be predicted by retrieving, from the context memory, what followed each symbol the
first time — the induction behaviour the leaky keys and look-ahead values make easy. Loss falls from
log(vocab) towards the cost of the unpredictable first half.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from memory_mosaics import MemoryMosaic, MemoryMosaicConfig
from memory_mosaics.commands._common import write_json
from memory_mosaics.train.optim import adamw


def copy_task_batch(batch_size: int, half: int, vocab_size: int, generator: torch.Generator):
    """(x, y): random strings over symbols 1..V-1, separator 0, the string again; loss on the copy only."""
    strings = torch.randint(1, vocab_size, (batch_size, half), generator=generator)
    separator = torch.zeros(batch_size, 1, dtype=torch.long)
    sequence = torch.cat([strings, separator, strings], dim=1)
    x, y = sequence[:, :-1], sequence[:, 1:].clone()
    y[:, :half] = -1  # the first half is random: nothing to learn there
    return x, y


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = MemoryMosaicConfig(
        vocab_size=args.vocab_size,
        block_size=2 * args.half,
        n_layer=2,
        n_head=4,
        n_embd=64,
        pmem_size=224,
        dropout=0.0,
    )
    model = MemoryMosaic(config)
    optimizer = adamw(model.parameters(), lr=args.lr, weight_decay=0.0)
    print(
        f"Memory Mosaic with {model.num_params():,} non-embedding parameters; copy task, "
        f"{args.half} random symbols of {args.vocab_size - 1} then the same again"
    )
    print(f"chance level on the copied half: {math.log(args.vocab_size - 1):.3f} nats")
    history, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = copy_task_batch(args.batch_size, args.half, args.vocab_size, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item()})
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss on the copy {loss.item():.3f}  ({time.perf_counter() - start:.1f} s)")
    if args.json:
        write_json(args.json, {"config": config.to_dict(), "history": history})
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny Memory Mosaic on an in-context copy task (no data needed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=_positive, default=120)
    parser.add_argument("--batch-size", type=_positive, default=16)
    parser.add_argument("--half", type=_positive, default=32, help="length of the random string")
    parser.add_argument("--vocab-size", type=_positive, default=17)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=_positive, default=20)
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (pays off for wider models; this one is tiny)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the loss history as JSON")
    parser.set_defaults(run=run)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
