"""The compiled persistent-read kernel as it is now against the same kernel at an earlier commit.

Builds `src/memory_mosaics/ops/csrc/persistent_read_cpu.cpp` as it was at --against (read with `git
show`, compiled under its own module name with the same flags) beside the working tree's kernel, then
times one layer's read — (H, rows, d) queries against one (H, P, d) table, bf16, the kernel's forward
and backward called directly — in interleaved rounds (order alternating), median per kernel. Also
reports how far apart the two kernels' results are (0 when a change only moves work around) and each
one's relative error against float64, so a faster kernel that got less accurate shows it.

    python benchmarks/persistent_read_revisions.py --against 0e9b00d --rows 2048,8192 \\
        --json /tmp/persistent_read_revisions.json

Rows 2048 and 8192 are B x T for the benchmark's batch of 8 at T = 256 and 1,024. Needs a git checkout
and a CPU where the kernel runs (AVX-512 BF16, AMX).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from memory_mosaics.commands._common import check_writable
from memory_mosaics.errors import MosaicError
from memory_mosaics.ops import persistent_read_cpu

SOURCE = "src/memory_mosaics/ops/csrc/persistent_read_cpu.cpp"
REPOSITORY = Path(__file__).resolve().parent.parent


def build_at(revision: str):
    """The kernel's source at `revision`, compiled as its own module."""
    try:
        text = subprocess.run(
            ["git", "show", f"{revision}:{SOURCE}"], cwd=REPOSITORY, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise MosaicError(f"cannot read {SOURCE} at {revision!r}: {getattr(err, 'stderr', '') or err}") from err
    folder = Path(tempfile.mkdtemp(prefix="persistent_read_at_"))
    path = folder / "persistent_read_cpu.cpp"
    path.write_text(text)
    name = f"persistent_read_at_{revision.replace('/', '_').replace('~', '_')}"
    return load(name, [str(path)], extra_cflags=persistent_read_cpu.COMPILE_FLAGS, verbose=False)


def problem(rows: int, heads: int = 4, dim: int = 64, slots: int = 896):
    """Queries of norm 3 (as scaled keys), tables and an output gradient; bf16, fixed seed."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(heads, rows, dim, generator=generator), dim=-1) * 3
    keys = torch.randn(heads, slots, dim, generator=generator) / 2
    values = torch.randn(heads, slots, dim, generator=generator) / 8
    grad = torch.randn(heads, rows, dim, generator=generator)
    return [t.bfloat16() for t in (queries, keys, values, grad)]


def call(module, queries, keys, values, grad):
    """Forward and backward of the kernel; returns (seconds forward, seconds backward), results."""
    start = time.perf_counter()
    out, lse, *_ = module.forward(queries, keys, values, persistent_read_cpu.BLOCK_ROWS)
    middle = time.perf_counter()
    grads = module.backward(queries, keys, values, out, lse, grad, persistent_read_cpu.BLOCK_ROWS)
    end = time.perf_counter()
    return (middle - start, end - middle), [out, *grads]


def float64_results(queries, keys, values, grad):
    """out, dq, dk^T, dv^T (the kernel's layout) by plain softmax in float64."""
    leaves = [t.double().requires_grad_() for t in (queries, keys, values)]
    out = torch.softmax(leaves[0] @ leaves[1].transpose(1, 2), dim=-1) @ leaves[2]
    out.backward(grad.double())
    return [out.detach(), leaves[0].grad, leaves[1].grad.transpose(1, 2), leaves[2].grad.transpose(1, 2)]


def relative_errors(results, expected) -> list[float]:
    return [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(results, expected, strict=True)]


def compare(kernels: dict, rows: int, rounds: int) -> dict:
    inputs = problem(rows)
    expected = float64_results(*inputs)
    outputs = {name: call(module, *inputs)[1] for name, module in kernels.items()}
    now, before = outputs.values()
    seconds = {name: [] for name in kernels}
    for round_index in range(rounds):
        order = list(kernels) if round_index % 2 == 0 else list(kernels)[::-1]
        for name in order:
            seconds[name].append(call(kernels[name], *inputs)[0])
    names = ["out", "dq", "dk", "dv"]
    differences = [(a.double() - b.double()).abs().max().item() for a, b in zip(now, before, strict=True)]
    return {
        "rows": rows,
        "ms": {
            name: {
                "forward": 1e3 * statistics.median(s[0] for s in times),
                "backward": 1e3 * statistics.median(s[1] for s in times),
            }
            for name, times in seconds.items()
        },
        "max_difference": dict(zip(names, differences, strict=True)),
        "relative_error_vs_float64": {
            name: dict(zip(names, relative_errors(r, expected), strict=True)) for name, r in outputs.items()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="git revision of the kernel to compare with")
    parser.add_argument("--rows", default="2048,8192", help="query rows (B x T), comma-separated")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="where to write the result (nothing is written without it)")
    args = parser.parse_args()
    try:  # before the work, not after it
        rows = [int(value) for value in args.rows.split(",")]
        if min(rows) <= 0 or args.rounds <= 0 or args.threads <= 0:
            raise ValueError
    except ValueError:
        parser.error("--rows takes positive integers separated by commas; --rounds and --threads positive")
    try:
        if args.json:
            check_writable(args.json, "--json")
        if persistent_read_cpu.kernel() is None:
            raise MosaicError("the persistent-read kernel does not run here (needs AVX-512 BF16 and AMX)")
        before = build_at(args.against)
    except MosaicError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    kernels = {"working tree": persistent_read_cpu.kernel(), args.against: before}
    results = [compare(kernels, n, args.rounds) for n in rows]
    for result in results:
        for name, ms in result["ms"].items():
            errors = result["relative_error_vs_float64"][name]
            timing = f"forward {ms['forward']:7.2f} ms  backward {ms['backward']:7.2f} ms"
            accuracy = ", ".join(f"{100 * e:.2f}%" for e in errors.values())
            print(f"rows {result['rows']:>6}  {name:>12}: {timing}  error vs float64 (out, dq, dk, dv) {accuracy}")
        print(f"             max difference between the two: {result['max_difference']}")
    if args.json:
        report = {"against": args.against, "rounds": args.rounds, "threads": args.threads, "results": results}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
