"""`mosaic train`: train a Memory Mosaic or a GPT on prepared data, with exact resume."""

from __future__ import annotations

import argparse

from memory_mosaics.errors import ConfigError

TRAIN_GROUP = "training (TrainConfig; also YAML keys)"
MODEL_GROUP = "model (MemoryMosaicConfig / GPTConfig; also YAML keys)"


def register(subparsers) -> None:
    from memory_mosaics import GPTConfig, MemoryMosaicConfig
    from memory_mosaics.train.config import TrainConfig, add_dataclass_flags

    parser = subparsers.add_parser(
        "train",
        help="train a Memory Mosaic or GPT on data from `mosaic prepare`",
        description=(
            "Train a model on a folder written by `mosaic prepare`. Settings come from the config "
            "defaults, then --preset NAME, then --config FILE (YAML with the same keys), then the flags "
            "typed here. Writes RUN/metrics.jsonl, RUN/loss.png and RUN/checkpoint/. For several "
            "processes: torchrun --nproc-per-node N -m memory_mosaics.cli train ..."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", help="prepared data folder (from `mosaic prepare`)")
    parser.add_argument("--out", help="run folder to create (or to continue with --resume)")
    parser.add_argument("--preset", help="a shipped preset, e.g. tinystories-cpu (see --list-presets)")
    parser.add_argument("--config", help="a YAML file of settings (keys as the flags, with underscores)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument(
        "--stop-at", type=int, metavar="STEP",
        help="save and exit after STEP steps (the schedule still follows --max-steps)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", metavar="F", help="also write the run summary as JSON to F")
    parser.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    seen: set[str] = set()
    add_dataclass_flags(parser.add_argument_group(TRAIN_GROUP), TrainConfig, seen)
    model_group = parser.add_argument_group(MODEL_GROUP)
    add_dataclass_flags(model_group, MemoryMosaicConfig, seen)
    add_dataclass_flags(model_group, GPTConfig, seen)
    parser.set_defaults(run=run)


def split_settings(settings: dict, origin: dict) -> tuple[dict, str, dict]:
    """Sort merged settings into (training settings, model type, model settings); refuse misplaced keys."""
    from memory_mosaics.train.config import TrainConfig, field_names, unknown_key_error
    from memory_mosaics.train.trainer import model_classes

    train_keys = field_names(TrainConfig)
    model_type = settings.get("model", "mosaic")
    if model_type not in ("mosaic", "gpt"):
        raise ConfigError(f"{origin.get('model', 'model')}: model must be mosaic or gpt, got {model_type!r}")
    own = field_names(model_classes(model_type)[1])
    other_type = "gpt" if model_type == "mosaic" else "mosaic"
    other = field_names(model_classes(other_type)[1])
    train_values, model_values = {}, {}
    for key, value in settings.items():
        if key in train_keys:
            train_values[key] = value
        elif key in own:
            model_values[key] = value
        elif key in other:
            raise ConfigError(
                f"{origin[key]}: {key} is a setting of the {other_type} model, but the model is {model_type}"
            )
        else:
            raise unknown_key_error(key, train_keys | own, origin[key])
    return train_values, model_type, model_values


def run(args: argparse.Namespace) -> int:
    from memory_mosaics.commands._common import write_json
    from memory_mosaics.train.config import TrainConfig, available_presets, build_dataclass, resolve_settings
    from memory_mosaics.train.trainer import train

    if args.list_presets:
        print("\n".join(available_presets()))
        return 0
    if not args.data or not args.out:
        raise ConfigError("mosaic train needs --data DIR (from `mosaic prepare`) and --out RUN")
    control = {"data", "out", "preset", "config", "resume", "stop_at", "no_progress", "json", "list_presets"}
    flags = {k: v for k, v in vars(args).items() if k not in control and k not in ("run", "command")}
    settings, origin = resolve_settings(args.preset, args.config, flags)
    train_values, _, model_values = split_settings(settings, origin)
    config = build_dataclass(TrainConfig, train_values, source="training settings")
    result = train(
        args.data, args.out, config, model_values,
        resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress,
    )  # fmt: skip
    summary = {
        "run": str(result.run_dir),
        "step": result.step,
        "finished": result.finished,
        "loss": result.last_loss,
        "val_loss": result.last_val_loss,
        "tokens_per_s": result.tokens_per_s,
    }
    if result.run_dir is not None and _is_main_process():
        state = "finished" if result.finished else "stopped"
        parts = [f"{state} at step {result.step}"]
        if result.last_loss is not None:
            parts.append(f"loss {result.last_loss:.4f}")
        if result.last_val_loss is not None:
            parts.append(f"val loss {result.last_val_loss:.4f}")
        if result.tokens_per_s:
            parts.append(f"{result.tokens_per_s:,.0f} tokens/s")
        print(f"{', '.join(parts)}; run folder {result.run_dir}")
        if args.json:
            write_json(args.json, summary)
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
