"""The `mosaic` command line: parse, call a library function, print.

Each subcommand lives in its own module under `memory_mosaics.commands` and exposes
`register(subparsers)`, which adds its parser and sets `run=<function(args) -> int>`.
Bad input raises a `MosaicError`; it is printed as one line and the exit code is 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from memory_mosaics import __version__
from memory_mosaics.errors import MosaicError

# Module names under memory_mosaics.commands, in the order `mosaic --help` lists them.
SUBCOMMANDS = ["demo", "prepare", "train", "eval", "sample", "inspect", "moons", "regbench", "bench", "reproduce"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mosaic",
        description="Memory Mosaics: train, evaluate, inspect and compare networks of associative memories.",
    )
    parser.add_argument("--version", action="version", version=f"memory-mosaics {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"memory_mosaics.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except MosaicError as err:
        print(f"mosaic {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mosaic {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
