"""`mosaic moons`: the three-moons toy of the paper's section 3, with a disentanglement score.

Trains a single context memory with 1 head x 6 dims and with 3 heads x 2 dims on the three-moons
series, then measures how the free-running prediction error falls with the context length, scores
how much each network splits the prediction across its heads, and draws the authors' figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from memory_mosaics.commands._common import check_writable, write_json
from memory_mosaics.errors import ConfigError

# --quick: short training on shorter windows, a coarser error curve. Enough for the qualitative result
# (see docs/moons.md); not the paper's recipe.
QUICK = {"steps": 200, "batch_size": 8, "seq_len": 400, "eval_windows": 64, "context_stride": 4}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "moons",
        help="three-moons toy: 1 head vs 3 heads, error vs context length, disentanglement score",
        description=(
            "Train the three-moons context memory with 1 head x 6 and 3 heads x 2 (spec section 8: "
            "500 AdamW steps of 64 windows of 800 steps, lr 1e-2 -> 5e-6), measure the prediction error "
            "of a 25-step free-running continuation against the context length on the held-out moon "
            "triple, compute the disentanglement score (docs/moons.md), and write PNG figures to --out."
        ),
    )
    parser.add_argument(
        "--out", default="out/moons", help="folder for the PNG figures, weights and results.json (default out/moons)"
    )
    parser.add_argument("--json", metavar="F", help="also write the results as JSON to F")
    parser.add_argument("--steps", type=int, help="training steps (default 500; 200 with --quick)")
    parser.add_argument("--batch-size", type=int, help="windows per step (default 64; 8 with --quick)")
    parser.add_argument("--seq-len", type=int, help="window length (default 800; 400 with --quick)")
    parser.add_argument("--eval-windows", type=int, help="windows in the error curves (default 512; 64 with --quick)")
    parser.add_argument(
        "--context-stride", type=int, help="evaluate every k-th context length (default 1; 4 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="a short run (a minute or two): " + str(QUICK))
    parser.add_argument("--seed", type=int, default=100, help="seed of initialisation and batches (default 100)")
    parser.add_argument(
        "--bias-correction",
        action="store_true",
        help="train with PyTorch's bias-corrected AdamW instead of the authors' MLX AdamW (no bias correction)",
    )
    parser.set_defaults(run=run)


def _settings(args: argparse.Namespace) -> dict:
    settings = {"steps": 500, "batch_size": 64, "seq_len": 800, "eval_windows": 512, "context_stride": 1}
    if args.quick:
        settings.update(QUICK)
    for name in settings:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    return settings


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from memory_mosaics.tasks.moons.experiment import MoonsExperimentConfig, run_experiment
    from memory_mosaics.tasks.moons.train import MoonsTrainConfig

    settings = _settings(args)
    if settings["seq_len"] > 800:
        raise ConfigError(f"--seq-len must be at most 800 (the moons block size), got {settings['seq_len']}")
    config = MoonsExperimentConfig(
        train=MoonsTrainConfig(
            steps=settings["steps"],
            batch_size=settings["batch_size"],
            seq_len=settings["seq_len"],
            seed=args.seed,
            bias_correction=args.bias_correction,
        ),
        eval_windows=settings["eval_windows"],
        context_stride=settings["context_stride"],
    )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if args.json:
        check_writable(args.json, "--json")
    bars: dict[str, tqdm] = {}

    def on_step(label: str, step: int, loss: float) -> None:
        if label not in bars:
            bars[label] = tqdm(total=config.train.steps, desc=f"training {label}", unit="step")
        bars[label].update(1)
        bars[label].set_postfix(loss=f"{loss:.4f}")
        if step + 1 == config.train.steps:
            bars[label].close()

    # Sharp attention underflows to denormal floats, whose CPU arithmetic is slow (2x the training time);
    # flushing them to zero changes nothing measurable. Restored afterwards (tests call commands in-process).
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    try:
        results = run_experiment(config, out, on_step=on_step)
    finally:
        torch.set_flush_denormal(False)
    results["wall_seconds"] = time.perf_counter() - started
    results["torch_threads"] = torch.get_num_threads()
    write_json(out / "results.json", results)
    if args.json:
        write_json(args.json, results)

    periods = results["runs"][0]["evaluations"]["held_out"]["period_tokens"]
    joint = results["runs"][0]["evaluations"]["held_out"]["joint_period_tokens"]
    print(
        f"held-out triple {results['held_out_triple']}: moon periods "
        f"{', '.join(f'{p:.1f}' for p in periods)} tokens, joint period {joint:.1f} tokens"
    )
    print("mean |prediction - truth| by context length L (free-running 25 steps / one teacher-forced step):")
    print(f"{'network':<16}{'disentangle':>12}{'L<=longest':>18}{'longest<L<=joint':>20}{'L>joint':>18}")
    for run_ in results["runs"]:
        cells = []
        for band in ("before_longest_period", "longest_to_joint_period", "after_joint_period"):
            pair = (run_["error_bands"][band], run_["one_step_error_bands"][band])
            cells.append(" / ".join("-" if v is None else f"{v:.3g}" for v in pair))
        name = f"{run_['heads']} head(s) x {run_['head_dim']}"
        print(f"{name:<16}{run_['disentanglement']:>12.3f}{cells[0]:>18}{cells[1]:>20}{cells[2]:>18}")
    print(f"figures and results.json in {out} ({results['wall_seconds']:.0f} s)")
    return 0
