"""`mosaic inspect`: what every memory of a Memory Mosaic retrieved for each token of a text."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from memory_mosaics.commands._common import check_writable, write_json
from memory_mosaics.errors import MosaicError

DEFAULT_TOP_K = 5
DEFAULT_MAX_TOKENS = 256


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what each memory retrieved, token by token (HTML page, JSON, PNG)",
        description=(
            "Run a Memory Mosaic checkpoint on a text and show, for every position, layer and head, which "
            "stored context entries the query retrieved (weights, surrounding tokens, contribution to the "
            "output), which persistent-memory slots answered, and each head's learned leak and key scale. "
            "Writes a self-contained HTML page (no network needed), JSON and a PNG summary. "
            "See docs/inspect.md for the definitions."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        metavar="DIR",
        help="a folder written by save_pretrained, or a training run folder (model in DIR/checkpoint)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="T", help="the text to inspect (needs the checkpoint's tokenizer/)")
    source.add_argument("--file", metavar="F", help="a UTF-8 text file to inspect (needs the tokenizer)")
    source.add_argument("--ids", metavar="1,2,3", help="comma-separated token ids (no tokenizer needed)")
    parser.add_argument("--html", metavar="F", help="write the interactive page here")
    parser.add_argument("--json", metavar="F", help="write the full report as JSON here")
    parser.add_argument("--png", metavar="F", help="write a summary figure here")
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help="entries and slots kept per head and position",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="refuse longer inputs (the page holds every head's N x N retrieval matrix)",
    )
    parser.set_defaults(run=run)


def _read_ids(args: argparse.Namespace, tokenizer, vocab_size: int) -> list[int]:
    from memory_mosaics.inspect.source import encode_text, parse_ids

    if args.ids is not None:
        return parse_ids(args.ids, vocab_size)
    if args.text is not None:
        return encode_text(args.text, tokenizer, "--text", vocab_size)
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MosaicError(f"--file {args.file}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MosaicError(f"--file {args.file}: cannot read it as UTF-8 text ({err})") from None
    return encode_text(text, tokenizer, f"--file {args.file}", vocab_size)


def run(args: argparse.Namespace) -> int:
    from memory_mosaics.inspect.html import heatmap_payload, render_html
    from memory_mosaics.inspect.plots import plot_summary
    from memory_mosaics.inspect.report import build_report
    from memory_mosaics.inspect.retrieval import inspect_sequence
    from memory_mosaics.inspect.source import describer, load_mosaic, load_tokenizer_near

    if not (args.html or args.json or args.png):
        raise MosaicError("nothing to write: pass at least one of --html F, --json F, --png F")
    if args.top_k < 1:
        raise MosaicError(f"--top-k must be >= 1, got {args.top_k}")
    if args.max_tokens < 1:
        raise MosaicError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    for path, flag in ((args.html, "--html"), (args.json, "--json"), (args.png, "--png")):
        if path is not None:
            check_writable(path, flag)

    model, folder = load_mosaic(args.ckpt)
    tokenizer = load_tokenizer_near(folder, args.ckpt)
    ids = _read_ids(args, tokenizer, model.config.vocab_size)
    if len(ids) > args.max_tokens:
        raise MosaicError(
            f"the input has {len(ids)} tokens, more than --max-tokens {args.max_tokens}; "
            "inspect a shorter passage or raise --max-tokens"
        )
    inspection = inspect_sequence(model, ids, args.top_k)
    meta = {
        "checkpoint": str(folder),
        "tokenizer": getattr(tokenizer, "name", None),
        "config": model.config.to_dict(),
        "top_k": args.top_k,
    }
    report = build_report(inspection, describer(tokenizer), meta)
    written = []
    if args.json:
        write_json(args.json, report)
        written.append(args.json)
    if args.html:
        _write_text(args.html, render_html(report, heatmap_payload(inspection)))
        written.append(args.html)
    if args.png:
        plot_summary(inspection, args.png, title=f"mosaic inspect: {folder}")
        written.append(args.png)
    config = model.config
    print(
        f"inspected {len(ids)} tokens through {config.n_layer} layers x {config.n_head} heads "
        f"(rebuilt vs model output: max abs error {inspection.max_error:.1e})"
    )
    for path in written:
        print(f"wrote {path}")
    return 0


def _write_text(path: str, text: str) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MosaicError(f"cannot write {target}: {err.strerror or err}") from err
