"""The whole three-moons experiment: train 1 head x 6 and 3 heads x 2, measure, plot, summarise.

`run_experiment` returns the JSON-ready results `{"runs": [{"heads": 1, ...}, {"heads": 3, ...}], ...}`
and writes the PNG figures into the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from memory_mosaics.errors import ConfigError
from memory_mosaics.tasks.moons import plots
from memory_mosaics.tasks.moons.analysis import (
    disentanglement,
    error_bands,
    error_vs_context,
    one_step_error_vs_context,
    retrieval_phase_match,
)
from memory_mosaics.tasks.moons.data import ThreeMoons
from memory_mosaics.tasks.moons.model import MoonsMemory, MoonsModelConfig, clipped_mse, generate
from memory_mosaics.tasks.moons.train import MoonsTrainConfig, train_moons

SHOWCASE_TRAIN_TRIPLE = (0.5, 1.0, 2.5)  # the authors' training triple #5: own periods well below joint


@dataclass
class MoonsExperimentConfig:
    """What to train and how thoroughly to measure it.

    eval_windows: windows of the evaluation triples averaged in the error curves (authors: 512).
    num_predictions: free-running steps per context length (authors' plotctx: 25).
    context_stride: evaluate every k-th context length (1 = all of 1..T-num_predictions+1).
    margin: tokens past a period before the context counts as "covering" it (summary bands).
    """

    train: MoonsTrainConfig = field(default_factory=MoonsTrainConfig)
    heads: tuple[tuple[int, int], ...] = ((1, 6), (3, 2))
    eval_windows: int = 512
    num_predictions: int = 25
    context_stride: int = 1
    margin: int = 5

    def __post_init__(self) -> None:
        for name in ("eval_windows", "num_predictions", "context_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"MoonsExperimentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.train.seq_len <= self.num_predictions:
            raise ConfigError(f"seq_len {self.train.seq_len} must exceed num_predictions {self.num_predictions}")

    def to_dict(self) -> dict:
        return asdict(self)


def _evaluate_triple(model, data, triple, windows, config, context_lengths, authors_cache=False) -> dict:
    """Error curves on one triple; `authors_cache` adds the curve without value writes (costly: held-out only)."""
    periods, joint = data.period_tokens(triple)
    x, y = windows
    pred, _ = model(x)
    curve = error_vs_context(model, x, y, context_lengths, config.num_predictions).tolist()
    one_step = one_step_error_vs_context(model, x, y).tolist()  # entry L-1: context length L
    every_length = list(range(1, len(one_step) + 1))
    result = {
        "periods": list(triple),
        "period_tokens": periods,
        "joint_period_tokens": joint,
        "teacher_forced_loss": clipped_mse(pred, y).item(),
        "teacher_forced_mae": (pred - y).abs().mean().item(),
        "error_vs_context": curve,
        "error_bands": error_bands(context_lengths, curve, periods, joint, config.margin),
        "one_step_error_vs_context": one_step,
        "one_step_error_bands": error_bands(every_length, one_step, periods, joint, config.margin),
    }
    if authors_cache:
        buggy = error_vs_context(model, x, y, context_lengths, config.num_predictions, write_values=False)
        result["error_vs_context_authors_cache"] = buggy.tolist()
        result["error_bands_authors_cache"] = error_bands(
            context_lengths, buggy.tolist(), periods, joint, config.margin
        )
    return result


def _eval_windows(data: ThreeMoons, triple, count: int, seq_len: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    high = data.config.num_points - 2 * data.config.block_size - 1
    starts = torch.randint(high, (count,), generator=generator)
    return data.windows(triple, starts, seq_len), starts


def run_experiment(
    config: MoonsExperimentConfig,
    out_dir: Path,
    data: ThreeMoons | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
) -> dict:
    """Train each head layout, measure it on the held-out triple and one training triple, write PNGs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = data or ThreeMoons()
    seq_len = config.train.seq_len
    context_lengths = list(range(1, seq_len - config.num_predictions + 2, config.context_stride))
    triples = {"held_out": data.val_triple, "train_example": SHOWCASE_TRAIN_TRIPLE}
    windows = {}
    for i, (name, triple) in enumerate(triples.items()):
        windows[name], starts = _eval_windows(data, triple, config.eval_windows, seq_len, seed=1000 + i)
        windows[name + "_phases"] = data.angles(triple)[starts[:, None] + torch.arange(seq_len + 1)]

    runs, curves, buggy_curves, one_step_curves = [], {}, {}, {}
    for n_head, head_dim in config.heads:
        label = f"{n_head} head{'s' if n_head > 1 else ''} x {head_dim}"
        started = time.perf_counter()
        model, losses = train_moons(
            MoonsModelConfig(n_head=n_head, head_dim=head_dim),
            config.train,
            data,
            on_step=None if on_step is None else lambda step, loss, label=label: on_step(label, step, loss),
        )
        train_seconds = time.perf_counter() - started
        with torch.no_grad():
            evaluations = {
                name: _evaluate_triple(
                    model, data, triple, windows[name], config, context_lengths, authors_cache=name == "held_out"
                )
                for name, triple in triples.items()
            }
            phase_x = windows["held_out"][0][:16]
            phase_match = retrieval_phase_match(model, phase_x, windows["held_out_phases"][:16])
        score = disentanglement(model)
        held_out = evaluations["held_out"]
        runs.append(
            {
                "heads": n_head,
                "head_dim": head_dim,
                "disentanglement": score["score"],
                "disentanglement_detail": score,
                "error_vs_context": held_out["error_vs_context"],
                "context_lengths": context_lengths,
                "error_bands": held_out["error_bands"],
                "one_step_error_vs_context": held_out["one_step_error_vs_context"],
                "one_step_error_bands": held_out["one_step_error_bands"],
                "retrieval_phase_match": phase_match.tolist(),
                "evaluations": evaluations,
                "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
                "train_losses": losses,
                "train_seconds": train_seconds,
            }
        )
        curves[label] = held_out["error_vs_context"]
        buggy_curves[label] = held_out["error_vs_context_authors_cache"]
        one_step_curves[label] = held_out["one_step_error_vs_context"]
        save_file(
            {name: p.detach().contiguous() for name, p in model.state_dict().items()},
            out_dir / f"model_{n_head}head.safetensors",
            metadata={"config": json.dumps(model.config.to_dict())},
        )
        _plot_run(out_dir, model, data, triples, windows, label, n_head, seq_len)

    periods, joint = data.period_tokens(data.val_triple)
    plots.plot_error_vs_context(
        out_dir / "error_vs_context.png",
        [
            (f"{config.num_predictions} free-running steps", context_lengths, curves),
            ("the same, values never written (authors' cache)", context_lengths, buggy_curves),
            ("one teacher-forced step", list(range(1, seq_len + 1)), one_step_curves),
        ],
        periods,
        joint,
        f"held-out triple {list(data.val_triple)}, mean over {config.eval_windows} windows",
    )
    return {
        "runs": runs,
        "held_out_triple": list(data.val_triple),
        "train_triples": [list(t) for t in data.train_triples],
        "tokens_per_time_unit": data.tokens_per_unit,
        "config": config.to_dict(),
    }


def _plot_run(out_dir, model: MoonsMemory, data, triples, windows, label, n_head, seq_len) -> None:
    tag = f"{n_head}head"
    prompt_len = seq_len // 2
    panels = []
    with torch.no_grad():
        for name, triple in triples.items():
            x, y = windows[name]
            x, y = x[:1], y[:1]
            periods, joint = data.period_tokens(triple)
            panels.append(
                {
                    "name": f"{name.replace('_', ' ')} {list(triple)}",
                    "truth": y[0],
                    "teacher": model(x)[0][0],
                    "generated": generate(model, x[:, :prompt_len], seq_len - prompt_len + 1)[0],
                    "periods": periods,
                    "joint": joint,
                }
            )
        attention = model.attention(windows["held_out"][0][:1])[0]
    plots.plot_generations(out_dir / f"generations_{tag}.png", panels, prompt_len, label)
    plots.plot_attention(out_dir / f"attention_{tag}.png", attention, f"{label}, held-out triple")
    plots.plot_complex_blocks(out_dir / f"complex_blocks_{tag}.png", model, label)
