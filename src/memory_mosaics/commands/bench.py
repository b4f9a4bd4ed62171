"""`mosaic bench`: training throughput and peak memory of Memory Mosaic vs GPT vs a plain nanoGPT.

Equal parameter counts (n_layer 4, n_embd 256, n_head 4, vocab 4096, batch 8), forward + backward +
AdamW, T in {256, 1024, 4096}, float32 and bfloat16 autocast, interleaved rounds in one process;
see memory_mosaics.bench.throughput for the method and docs/performance.md for results.
"""

from __future__ import annotations

import argparse
import sys

from memory_mosaics.commands._common import check_writable, write_json
from memory_mosaics.errors import ConfigError

QUICK = {"lengths": (256,), "rounds": 3}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="training throughput and memory: Memory Mosaic vs GPT vs nanoGPT",
        description=(
            "Measure forward+backward+AdamW tokens/s of MemoryMosaic, the project's GPT and a plain "
            "nanoGPT at equal size, interleaved in one process (median of --rounds; each ratio with a 95% "
            "bootstrap interval over the rounds), peak memory per model in a fresh process, and MFU "
            "against the matrix-product peak measured in the same run."
        ),
    )
    parser.add_argument("--json", metavar="F", help="write the full result as JSON to F")
    parser.add_argument("--png", metavar="F", help="write the figure (tokens/s and MM/GPT ratios) to F")
    parser.add_argument("--quick", action="store_true", help="T=256 only, 3 rounds (a few minutes)")
    parser.add_argument("--lengths", help="comma-separated sequence lengths (default 256,1024,4096)")
    parser.add_argument("--dtypes", help="comma-separated: float32,bfloat16 (default both)")
    parser.add_argument("--models", help="comma-separated subset of mosaic,gpt,nanogpt (default all)")
    parser.add_argument(
        "--batch-size", type=int, help="sequences per step (default 8; 1 with a short --lengths: the fixed cost)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds per cell (default 5)")
    parser.add_argument("--steps-per-round", type=int, help="steps timed per model and round (default 1)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps per model before a cell (default 1)")
    parser.add_argument(
        "--settle-steps",
        type=int,
        help="untimed steps of a model right before each of its timed steps, so that it follows itself (default 1)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block of every model")
    parser.set_defaults(run=run)


def _tuple(text: str, field: str, convert=str) -> tuple:
    try:
        values = tuple(convert(part) for part in text.split(",") if part)
    except ValueError as err:
        raise ConfigError(f"--{field}: expected a comma-separated list, got {text!r}") from err
    if not values:
        raise ConfigError(f"--{field}: empty list")
    return values


def settings_from_args(args: argparse.Namespace):
    from memory_mosaics.bench.throughput import MODELS, ThroughputSettings

    settings = ThroughputSettings(device=args.device, memory=not args.no_memory, compile=args.compile)
    if args.quick:
        for name, value in QUICK.items():
            setattr(settings, name, value)
    if args.lengths:
        settings.lengths = _tuple(args.lengths, "lengths", int)
        if min(settings.lengths) < 2:
            raise ConfigError("--lengths: every length must be >= 2")
    if args.dtypes:
        settings.dtypes = _tuple(args.dtypes, "dtypes")
        unknown = set(settings.dtypes) - {"float32", "bfloat16"}
        if unknown:
            raise ConfigError(f"--dtypes: unknown {', '.join(sorted(unknown))}; use float32 and/or bfloat16")
    if args.models:
        settings.models = _tuple(args.models, "models")
        unknown = set(settings.models) - set(MODELS)
        if unknown:
            raise ConfigError(f"--models: unknown {', '.join(sorted(unknown))}; known: {', '.join(MODELS)}")
    if args.settle_steps is not None:
        if args.settle_steps < 0:
            raise ConfigError(f"--settle-steps must be >= 0, got {args.settle_steps}")
        settings.settle_steps = args.settle_steps
    for name in ("batch_size", "rounds", "steps_per_round", "warmup_steps", "threads"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(settings, name, value)
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
    elif settings.device != "cpu":
        raise ConfigError(f"--device must be cpu or cuda, got {settings.device!r}")
    return settings


def run(args: argparse.Namespace) -> int:
    from memory_mosaics.bench.report import markdown_table, plot_throughput
    from memory_mosaics.bench.throughput import run_throughput

    settings = settings_from_args(args)
    for flag, path in (("--json", args.json), ("--png", args.png)):
        if path:
            check_writable(path, flag)
    result = run_throughput(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown_table(result))
    if args.json:
        write_json(args.json, result)
    if args.png:
        plot_throughput(result, args.png)
    return 0
