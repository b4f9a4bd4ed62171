"""`mosaic sample`: continue a prompt with a trained model, streaming text as it is produced."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
from torch import nn

from memory_mosaics.errors import ConfigError
from memory_mosaics.inference.options import EVICTION_POLICIES, RETRIEVAL_METHODS, InferenceOptions


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate text from a trained model",
        description=(
            "Continue --prompt with a checkpoint's model, printing text as tokens are drawn. The prompt "
            "starts a new document (an end-of-text token is put before it); generation stops at the next "
            "end-of-text token unless --no-stop."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="run folder (or checkpoint folder)")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (1 turns it off)")
    parser.add_argument("--seed", type=int, default=None, help="make the draws reproducible")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--no-stop", action="store_true", help="keep going past an end-of-text token")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", metavar="F", help="also write the prompt and samples as JSON to F")
    memory = parser.add_argument_group(
        "inference memory (Memory Mosaic only; see docs/inference.md)",
        "Bound each context memory or make retrieval approximate; unset options keep the exact, unbounded memory.",
    )
    memory.add_argument("--memory-size", type=int, help="capacity M of each context memory (entries per head)")
    memory.add_argument("--eviction", choices=EVICTION_POLICIES, help="policy when a memory is full")
    memory.add_argument("--sink-size", type=int, help="sink+recent: first entries never evicted")
    memory.add_argument("--lru-threshold", type=float, help="lru: retrieval weight at which an entry counts as used")
    memory.add_argument("--retrieval", choices=RETRIEVAL_METHODS, help="how a query reads the memory")
    memory.add_argument("--lsh-tables", type=int, help="lsh: number of hash tables")
    memory.add_argument("--lsh-bits", type=int, help="lsh: hyperplanes per table")
    memory.add_argument("--num-features", type=int, help="features: random features per head")
    parser.set_defaults(run=run)


# Every inference option has a flag of the same name, except the hyperplane/feature seed (--seed draws tokens).
STATE_OPTIONS = tuple(field.name for field in dataclasses.fields(InferenceOptions) if field.name != "seed")


class VocabularyLimit(nn.Module):
    """Hide logits of ids the tokenizer cannot decode (a model's vocab_size may be padded, e.g. 50304).
    Keeps the model's recurrent state, so generation still costs one step per token."""

    def __init__(self, model: nn.Module, vocab_size: int):
        super().__init__()
        self.model, self.config, self.vocab_size = model, model.config, vocab_size

    def forward(self, idx: torch.Tensor, targets=None):
        logits, _ = self.model(idx)
        return logits[..., : self.vocab_size], None

    def init_state(self, batch_size: int, **options):
        return self.model.init_state(batch_size, **options)

    def step(self, idx: torch.Tensor, state):
        logits, state = self.model.step(idx, state)
        return logits[..., : self.vocab_size], state


def state_options(args: argparse.Namespace) -> dict:
    """The inference-memory flags that were given, as `init_state` options (the others keep defaults)."""
    return {name: getattr(args, name) for name in STATE_OPTIONS if getattr(args, name, None) is not None}


class TextStream:
    """Print decoded text as tokens arrive, holding back a partial multi-byte character."""

    def __init__(self, tokenizer, out=sys.stdout, stop_token: int | None = None):
        self.tokenizer, self.out, self.stop_token = tokenizer, out, stop_token
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False

    def __call__(self, column: torch.Tensor) -> None:
        token = int(column[0])
        if self.stopped or token == self.stop_token:
            self.stopped = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()
        return text


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")


def run(args: argparse.Namespace) -> int:
    from memory_mosaics.commands._common import write_json
    from memory_mosaics.inference.generate import generate
    from memory_mosaics.train.checkpoint import load_model, load_tokenizer_of

    _check_args(args)
    tokenizer = load_tokenizer_of(args.ckpt)
    model = load_model(args.ckpt, args.device)
    if model.config.vocab_size > tokenizer.vocab_size:
        model = VocabularyLimit(model, tokenizer.vocab_size)
    options = state_options(args)
    if options:  # refuse bad memory options before the prompt is echoed
        model.init_state(1, **options)
    prompt_ids = [tokenizer.eot_id, *tokenizer.encode(args.prompt)]
    samples = []
    for i in range(args.num_samples):
        if i:
            print("\n---")
        sys.stdout.write(args.prompt)
        stream = TextStream(tokenizer, sys.stdout, None if args.no_stop else tokenizer.eot_id)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=args.device)
        seed = None if args.seed is None else args.seed + i
        generate(
            model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, stop_token=stream.stop_token, seed=seed, stream=stream,
            state_options=options,
        )  # fmt: skip
        samples.append(stream.finish())
    if args.json:
        write_json(args.json, {"ckpt": args.ckpt, "prompt": args.prompt, "samples": samples, "seed": args.seed})
    return 0
