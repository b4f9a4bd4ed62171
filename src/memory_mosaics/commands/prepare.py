"""`mosaic prepare`: turn a corpus into token shards and a manifest that `mosaic train` reads."""

from __future__ import annotations

import argparse
import sys

from memory_mosaics.commands._common import write_json
from memory_mosaics.data.corpora import FORMATS, NAMED
from memory_mosaics.data.prepare import prepare_dataset
from memory_mosaics.data.tokenizers import DEFAULT_BPE_VOCAB, GPT2_ENV, KINDS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into train/val token shards",
        description=(
            "Tokenize a corpus into DIR/train.bin and DIR/val.bin (every document followed by an "
            "end-of-text token), with DIR/manifest.json and the tokenizer in DIR/tokenizer/. "
            f"SRC is a .txt file, a .jsonl file, a folder of those, or one of: {', '.join(NAMED)}. "
            "See docs/data.md for the document-splitting rules."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, metavar="SRC", help="the corpus to tokenize")
    parser.add_argument(
        "--val",
        metavar="SRC",
        help="a separate validation corpus (default: hold out --val-fraction of --data)",
    )
    parser.add_argument("--tokenizer", required=True, choices=KINDS, help="gpt2, a bpe trained on --data, or byte")
    parser.add_argument(
        "--vocab-size", type=int, metavar="N", help=f"bpe vocabulary size (default {DEFAULT_BPE_VOCAB})"
    )
    parser.add_argument(
        "--gpt2-dir",
        metavar="DIR",
        help=f"folder with GPT-2's encoder.json and vocab.bpe, for offline use (or set {GPT2_ENV})",
    )
    parser.add_argument("--val-fraction", type=float, default=0.05, metavar="F", help="share of documents held out")
    parser.add_argument("--max-docs", type=int, metavar="N", help="keep only the first N documents of each source")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--text-field", default="text", help="the field holding the text in .jsonl files")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="how to read files (auto: by suffix)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--json", metavar="F", help="also write the manifest to this JSON file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    manifest = prepare_dataset(
        args.data,
        args.out,
        args.tokenizer,
        val=args.val,
        vocab_size=args.vocab_size,
        gpt2_dir=args.gpt2_dir,
        val_fraction=args.val_fraction,
        max_docs=args.max_docs,
        seed=args.seed,
        text_field=args.text_field,
        fmt=args.format,
        force=args.force,
        progress=sys.stderr.isatty(),
    )
    tok = manifest["tokenizer"]
    print(f"prepared {args.out}: tokenizer {tok['name']} (vocab {tok['vocab_size']}, {tok['fingerprint']})")
    for split, entry in manifest["splits"].items():
        print(f"  {split:5s} {entry['documents']:>9,} documents {entry['tokens']:>13,} tokens")
    if args.json:
        write_json(args.json, manifest)
    return 0
