"""The command-line options the benchmark scripts share, and their checks.

Each script measures for minutes, so a bad value must stop it before the first step: the checks here end
the command with argparse's one-line error (exit 2). The scripts run from this folder
(`python benchmarks/NAME.py`), which puts it first on the import path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from memory_mosaics.commands._common import check_writable
from memory_mosaics.errors import MosaicError

DTYPES = ("bfloat16", "float32")


def add_cell_options(
    parser: argparse.ArgumentParser,
    lengths: str | None = "256",
    dtypes: str = "bfloat16,float32",
    rounds: int = 5,
    threads: int = 0,
) -> None:
    """--lengths (unless None), --dtypes, --rounds and --threads, with these defaults."""
    if lengths is not None:
        parser.add_argument("--lengths", default=lengths, help=f"comma-separated sequence lengths (default {lengths})")
    parser.add_argument("--dtypes", default=dtypes, help=f"comma-separated, of {', '.join(DTYPES)} (default {dtypes})")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    parser.add_argument(
        "--threads", type=int, default=threads, help=f"torch threads, 0 for torch's choice (default {threads})"
    )


def add_settle_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--settle-steps",
        type=int,
        default=1,
        help="untimed steps of the same model right before each timed one (default 1): what ran just before "
        "moves a step's time",
    )


def integers(parser: argparse.ArgumentParser, option: str, text: str, minimum: int) -> list[int]:
    """Comma-separated integers, each at least `minimum`."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{option}: expected comma-separated integers, got {text!r}")
    if min(values) < minimum:
        parser.error(f"{option}: each must be at least {minimum}, got {text!r}")
    return values


def cell_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[int] | None, list[str]]:
    """Checks what `add_cell_options` (and `add_settle_option`, if added) parsed, sets the thread count, and
    returns the lengths (None without --lengths) and dtypes."""
    lengths = integers(parser, "--lengths", args.lengths, 2) if hasattr(args, "lengths") else None
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= set(DTYPES):
        parser.error(f"--dtypes: {' and/or '.join(DTYPES)}, got {args.dtypes!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads < 0:
        parser.error(f"--threads must be at least 0, got {args.threads}")
    if getattr(args, "settle_steps", 0) < 0:
        parser.error(f"--settle-steps must be at least 0, got {args.settle_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return lengths, dtypes


def writable(
    parser: argparse.ArgumentParser, path: str | Path | None, option: str = "--json", make_folder: bool = False
) -> Path | None:
    """`path` as a Path once it is known to be writable, or None for None. `make_folder`: create its folder
    if missing (for the scripts' own results folder, not for a path the user typed)."""
    if path is None:
        return None
    path = Path(path)
    try:
        if make_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        check_writable(path, option)
    except (OSError, MosaicError) as err:
        parser.error(str(err))
    return path
