"""`mosaic eval`: loss, perplexity and loss by position of trained models on a data set or a text file."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from memory_mosaics.errors import ConfigError, MosaicError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="loss, perplexity and loss by token position of trained models",
        description=(
            "Evaluate a checkpoint on a prepared data folder (its val split by default) or on any text "
            "file (documents separated by a line <|endoftext|>, or by blank lines), tokenized with the "
            "checkpoint's own tokenizer. --per-position adds the mean loss at each token position "
            "(windows start at document boundaries when there are any); --compare overlays other runs."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="run folder (or checkpoint folder) to evaluate")
    parser.add_argument("--data", required=True, help="prepared data folder, or a text/jsonl file")
    parser.add_argument("--split", default="val", choices=["train", "val"], help="split of a data folder")
    parser.add_argument("--per-position", action="store_true", help="also report the loss at each position")
    parser.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="more runs to evaluate alongside")
    parser.add_argument("--seq-len", type=int, help="window length (default: the model's block_size)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max-windows", type=int, help="evaluate at most this many windows / documents")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", metavar="F", help="write the results as JSON to F")
    parser.add_argument("--png", metavar="F", help="write the loss-by-position plot to F (with --per-position)")
    parser.set_defaults(run=run)


def load_eval_tokens(data: str, split: str, tokenizer) -> tuple[np.ndarray, str]:
    """Tokens to score: a prepared split (checked against `tokenizer`) or a text file tokenized with it."""
    from memory_mosaics.data import PreparedData, open_corpus

    path = Path(data)
    if path.is_dir():
        prepared = PreparedData.open(path)
        if prepared.tokenizer.fingerprint() != tokenizer.fingerprint():
            raise MosaicError(
                f"--data {path} was tokenized with {prepared.tokenizer.name} "
                f"(vocab {prepared.vocab_size}) but "
                f"the model was trained with {tokenizer.name} (vocab {tokenizer.vocab_size}); evaluate on "
                "data prepared with the model's tokenizer, or pass a text file"
            )
        return prepared.split(split), f"{path} ({split})"
    ids: list[int] = []
    for doc in open_corpus(str(path)).documents():
        ids += tokenizer.encode(doc)
        ids.append(tokenizer.eot_id)
    return np.asarray(ids, dtype=np.int64), str(path)


def evaluate_run(ckpt: str, args: argparse.Namespace) -> dict:
    from memory_mosaics import GPT
    from memory_mosaics.eval import evaluate_loss, per_position_loss
    from memory_mosaics.eval.metrics import fit_seq_len
    from memory_mosaics.train.checkpoint import load_model, load_tokenizer_of, resolve_checkpoint

    folder = resolve_checkpoint(ckpt)
    tokenizer = load_tokenizer_of(folder)
    model = load_model(folder, args.device)
    tokens, source = load_eval_tokens(args.data, args.split, tokenizer)
    block = model.config.block_size
    seq_len = args.seq_len or block
    if seq_len > block and isinstance(model, GPT):
        raise ConfigError(
            f"--seq-len {seq_len} is larger than the model's block_size {block}; a GPT has no positions past it"
        )
    seq_len = fit_seq_len(len(tokens), seq_len, source)
    result = evaluate_loss(model, tokens, seq_len, args.batch_size, args.dtype, args.max_windows, progress=True)
    row = {
        "ckpt": str(ckpt),
        "model_type": model.model_type,
        "data": source,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "tokens": result.tokens,
        "seq_len": seq_len,
        "per_position": None,
    }
    if args.per_position:
        curve = per_position_loss(
            model, tokens, seq_len, tokenizer.eot_id, args.batch_size, args.dtype, args.max_windows, progress=True
        )
        row.update(per_position=curve.losses, per_position_counts=curve.counts, per_position_mode=curve.mode)
    return row


def _check_args(args: argparse.Namespace) -> None:
    from memory_mosaics.commands._common import check_writable

    for name in ("seq_len", "batch_size", "max_windows"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.png and not args.per_position:
        raise ConfigError("--png draws the loss-by-position curve; add --per-position")
    for name in ("json", "png"):
        if getattr(args, name):
            check_writable(getattr(args, name), f"--{name}")


def _print_row(row: dict) -> None:
    print(f"{row['ckpt']}: loss {row['loss']:.4f}  perplexity {row['perplexity']:.2f}  ({row['tokens']:,} tokens)")
    curve = row.get("per_position")
    if curve:
        marks = [p for p in (0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047) if p < len(curve)]
        text = "  ".join(f"{p}:{curve[p]:.2f}" for p in marks if curve[p] is not None)
        print(f"  loss by position ({row['per_position_mode']}): {text}")


def run(args: argparse.Namespace) -> int:
    from memory_mosaics.commands._common import write_json
    from memory_mosaics.eval.plots import plot_per_position

    _check_args(args)
    rows = [evaluate_run(ckpt, args) for ckpt in [args.ckpt, *args.compare]]
    for row in rows:
        _print_row(row)
    payload = dict(rows[0])
    if args.compare:
        payload["compare"] = rows[1:]
    if args.png:
        curves = {f"{r['ckpt']} ({r['model_type']})": r["per_position"] for r in rows}
        plot_per_position(curves, args.png, title=f"loss by position on {rows[0]['data']}")
    if args.json:
        write_json(args.json, payload)
    return 0
