"""Cost of the leaky average against the sequence length: the chunked scan is linear in T.

Forward + backward (gradients for x and the decays) of `leaky_average` at batch 1, 4 heads of 64
dims, T = 256 ... 65,536, median of several runs; the dense T x T reference beside it while it fits,
and on CPUs the compiled key-features kernel (leaky average and normalisation in one pass,
`ops/features_cpu.py`; its input copied into the (B, T, C) projection layout inside the timing).

    python benchmarks/leaky_scaling.py     # writes benchmarks/results/leaky_scaling.{json,png}
    python benchmarks/leaky_scaling.py --device cuda --json F --png F   # on a GPU (Triton kernel if
                                                                        # installed; MOSAIC_TRITON=0: torch scan)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from memory_mosaics.bench.throughput import leaky_scan_in_use
from memory_mosaics.commands._common import check_writable
from memory_mosaics.errors import MosaicError
from memory_mosaics.ops import features_cpu, leaky_average, leaky_average_reference

RESULTS = Path(__file__).resolve().parent / "results"


def seconds(fn, x: torch.Tensor, beta: torch.Tensor, repeats: int) -> float:
    cuda = x.is_cuda
    times = []
    for _ in range(repeats + 1):  # the first run warms up and is dropped
        xs, bs = x.detach().requires_grad_(), beta.detach().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        y = fn(xs, bs)
        y.backward(torch.ones_like(y))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def compiled_keys(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The compiled key features of x (B, H, T, d), read as the (B, T, H d) projection the model passes."""
    batch, heads, length, _ = x.shape
    projected = x.transpose(1, 2).reshape(batch, length, -1)
    return features_cpu.key_features(projected, heads, beta, torch.ones_like(beta))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, default=65536)
    parser.add_argument("--dense-max-length", type=int, default=4096, help="longest T for the dense reference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=str(RESULTS / "leaky_scaling.json"))
    parser.add_argument("--png", default=str(RESULTS / "leaky_scaling.png"))
    args = parser.parse_args()
    if args.max_length < 256 or args.repeats < 1 or args.threads < 1:
        parser.error("--max-length must be at least 256, --repeats and --threads at least 1")
    RESULTS.mkdir(exist_ok=True)
    try:  # before the work, not after it
        for flag, path in (("--json", args.json), ("--png", args.png)):
            check_writable(path, flag)
    except MosaicError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    heads, dim = 4, 64
    beta = torch.linspace(0.5, 5.0, heads, device=args.device)
    rows = []
    length = 256
    while length <= args.max_length:
        x = torch.randn(1, heads, length, dim, device=args.device)
        row = {"seq_len": length, "chunked_seconds": seconds(leaky_average, x, beta, args.repeats)}
        if features_cpu.usable(x[:, 0]):
            row["compiled_keys_seconds"] = seconds(compiled_keys, x, beta, args.repeats)
        if length <= args.dense_max_length:
            row["dense_seconds"] = seconds(leaky_average_reference, x, beta, args.repeats)
        row["chunked_us_per_step"] = 1e6 * row["chunked_seconds"] / length
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        length *= 2
    first, last = rows[0], rows[-1]
    growth = (last["chunked_seconds"] / first["chunked_seconds"]) / (last["seq_len"] / first["seq_len"])
    result = {
        "settings": {
            "batch": 1,
            "heads": heads,
            "dim": dim,
            "dtype": "float32",
            "threads": args.threads,
            "device": args.device,
            "scan": leaky_scan_in_use(args.device),
        },
        "rows": rows,
        "time_growth_over_length_growth": growth,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.png)
    print(f"T x{last['seq_len'] // first['seq_len']}: time x{last['chunked_seconds'] / first['chunked_seconds']:.0f}")
    return 0


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["seq_len"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.loglog(lengths, [r["chunked_seconds"] for r in rows], "o-", label="chunked scan (ours)")
    compiled = [r for r in rows if "compiled_keys_seconds" in r]
    if compiled:
        label = "compiled keys kernel (average + normalisation)"
        ax.loglog([r["seq_len"] for r in compiled], [r["compiled_keys_seconds"] for r in compiled], "^-", label=label)
    dense = [r for r in rows if "dense_seconds" in r]
    ax.loglog([r["seq_len"] for r in dense], [r["dense_seconds"] for r in dense], "s-", label="dense T x T (reference)")
    base = rows[0]
    ax.loglog(lengths, [base["chunked_seconds"] * n / base["seq_len"] for n in lengths], "k:", label="linear in T")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward + backward seconds (B=1, H=4, d=64, fp32)")
    ax.set_title("Leaky average: cost against T")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
