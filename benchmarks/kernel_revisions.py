"""A compiled CPU kernel as it is now against the same kernel at an earlier commit.

Builds the kernel's C++ source as it was at --against (read with `git show`, with the shared headers of
that commit beside it, compiled under its own module name with the same flags) beside the working
tree's kernel, then calls both on the same inputs in interleaved rounds (order alternating) and reports
the median time of each call, how far apart the two kernels' results are (0 when a change only moves
work around) and, for the two reads, each one's relative error against float64, so a faster kernel
that got less accurate shows it.

- `--kernel persistent_read` (`ops/csrc/persistent_read_cpu.cpp`): one layer's read, (4, rows, 64)
  bf16 queries against one (4, 896, 64) table, forward and backward; rows 2048 and 8192 are B x T for
  the benchmark's batch of 8 at T = 256 and 1,024. Tables in bf16 (--tables float32 passes the float32
  parameters as the model does, which kernels before commit c0dd72b refuse). Needs AVX-512 BF16 and AMX.
- `--kernel features` (`ops/csrc/features_cpu.cpp`): one layer's key and value features, forward and
  backward, on a (8, rows / 8, 256) projection with 4 heads (d = 64), bf16 and float32.
- `--kernel context_read` (`ops/csrc/context_read_cpu.cpp`): one layer's causal read, forward and
  backward, 8 sequences of rows / 8 positions, 4 heads, d = 64, bf16 and float32 (commit e5af7f9 on; bf16
  only before cbb80af).

    python benchmarks/kernel_revisions.py --kernel persistent_read --against 0e9b00d --json /tmp/read.json
    python benchmarks/kernel_revisions.py --kernel features --against 8902263 --rows 2048

Needs a git checkout (the old source is read from the repository's history).
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
from memory_mosaics.layers.memory import merge_heads
from memory_mosaics.ops import context_read_cpu, context_retrieval_reference, features_cpu, persistent_read_cpu

REPOSITORY = Path(__file__).resolve().parent.parent
CSRC = "src/memory_mosaics/ops/csrc"


def git(*arguments: str) -> str:
    try:
        return subprocess.run(["git", *arguments], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        reason = (getattr(err, "stderr", "") or str(err)).strip()
        raise MosaicError(f"git {' '.join(arguments)}: {reason}") from err


def build_at(revision: str, source: str, flags: list[str]):
    """`source` (a file in csrc/) as it was at `revision`, with the headers beside it then, compiled as its
    own module."""
    folder = Path(tempfile.mkdtemp(prefix="kernel_at_"))
    for name in [source] + [n for n in git("ls-tree", "--name-only", f"{revision}:{CSRC}").split() if n.endswith(".h")]:
        (folder / name).write_text(git("show", f"{revision}:{CSRC}/{name}"))
    path = folder / source
    name = f"{path.stem}_at_" + "".join(c if c.isalnum() else "_" for c in revision)
    return load(name, [str(path)], extra_cflags=flags, verbose=False)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# -- the persistent read ------------------------------------------------------------------------------


def read_problem(rows: int, tables: torch.dtype, heads: int = 4, dim: int = 64, slots: int = 896):
    """bf16 queries of norm 3 (as scaled keys) and output gradient, tables in `tables`; fixed seed."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(heads, rows, dim, generator=generator), dim=-1) * 3
    keys = torch.randn(heads, slots, dim, generator=generator) / 2
    values = torch.randn(heads, slots, dim, generator=generator) / 8
    grad = torch.randn(heads, rows, dim, generator=generator)
    return [queries.bfloat16(), keys.to(tables), values.to(tables), grad.bfloat16()]


def takes_scale(module) -> bool:
    """Whether the kernel takes the output scale (kernels after commit 70c6222; its signature says)."""
    return "arg3: torch.Tensor" in module.forward.__doc__


def read_calls(module, queries, keys, values, grad) -> dict:
    """name -> (seconds, results) for the forward and the backward pass; the results as the current
    kernel returns them (dk, dv as (H, P, d); earlier kernels returned their transposes)."""
    rows = persistent_read_cpu.BLOCK_ROWS[torch.bfloat16]
    scale = [torch.ones(queries.shape[0])] if takes_scale(module) else []
    # Kernels since the float32 form take where to keep the float32 weights (here: nowhere, None), forward and
    # backward.
    kept = [None] if "arg5: torch.Tensor | None" in module.forward.__doc__ else []
    forward_seconds, (out, lse, *_) = timed(lambda: module.forward(queries, keys, values, *scale, rows, *kept))
    backward_seconds, grads = timed(lambda: module.backward(queries, keys, values, *scale, out, lse, grad, *kept, rows))
    grads = list(grads[:3]) if scale else [grads[0], grads[1].transpose(1, 2), grads[2].transpose(1, 2)]
    return {"forward": (forward_seconds, [out]), "backward": (backward_seconds, grads)}


def read_float64(queries, keys, values, grad) -> dict:
    """The same results by plain softmax in float64."""
    leaves = [t.double().requires_grad_() for t in (queries, keys, values)]
    out = torch.softmax(leaves[0] @ leaves[1].transpose(1, 2), dim=-1) @ leaves[2]
    out.backward(grad.double())
    return {"forward": [out.detach()], "backward": [leaf.grad for leaf in leaves]}


# -- the context read ---------------------------------------------------------------------------------


def context_problem(rows: int, dtype: torch.dtype, heads: int = 4, dim: int = 64):
    """Keys of norm 3 and values for a batch of 8 sequences of rows / 8 positions, head-major as the
    features kernels write them, and the read's gradient (B, T, H d); fixed seed."""
    generator = torch.Generator().manual_seed(0)
    batch, length = 8, rows // 8
    keys = torch.nn.functional.normalize(torch.randn(heads, batch, length, dim, generator=generator), dim=-1) * 3
    values = torch.randn(heads, batch, length, dim, generator=generator)
    grad = torch.randn(batch, length, heads * dim, generator=generator)
    return [keys.to(dtype).transpose(0, 1), values.to(dtype).transpose(0, 1), grad.to(dtype)]


def context_calls(module, keys, values, grad) -> dict:
    rows = context_read_cpu.BLOCK_ROWS[keys.dtype]
    forward_seconds, (out, lse) = timed(lambda: module.forward(keys, values, 1, rows))
    backward_seconds, grads = timed(lambda: module.backward(keys, values, out, lse, grad, 1, rows))
    return {"forward": (forward_seconds, [out]), "backward": (backward_seconds, list(grads))}


def context_float64(keys, values, grad) -> dict:
    leaves = [t.double().requires_grad_() for t in (keys, values)]
    out = merge_heads(context_retrieval_reference(*leaves, 1))
    out.backward(grad.double())
    return {"forward": [out.detach()], "backward": [leaf.grad for leaf in leaves]}


# -- the key and value features -----------------------------------------------------------------------


def features_problem(rows: int, dtype: torch.dtype, heads: int = 4, channels: int = 256):
    """A fused (key, value) projection as the context memory makes it, per-head parameters, a gradient."""
    generator = torch.Generator().manual_seed(0)
    batch = 8
    projected = torch.randn(batch, rows // batch, 2 * channels, generator=generator).to(dtype)
    decay, scale = torch.rand(heads, generator=generator), torch.full((heads,), 3.0)
    grad = torch.randn(batch, heads, rows // batch, channels // heads, generator=generator).to(dtype)
    return projected[..., :channels], heads, decay, scale, grad


def features_calls(module, x, heads, decay, scale, grad) -> dict:
    calls = {
        "keys forward": lambda: [module.key_forward(x, heads, decay, scale)],
        "keys backward": lambda: list(module.key_backward(grad, x, heads, decay, scale)),
        "values forward": lambda: [module.value_forward(x, heads, 1, decay, scale)],
        "values backward": lambda: list(module.value_backward(grad, x, heads, 1, decay, scale)),
    }
    return {name: timed(call) for name, call in calls.items()}


# -- comparing ------------------------------------------------------------------------------------------


def compare(kernels: dict, calls, inputs, rounds: int, expected: dict | None = None) -> dict:
    """Interleaved rounds of `calls` (module, *inputs) -> {name: (seconds, results)} for both kernels."""
    results = {label: calls(module, *inputs) for label, module in kernels.items()}
    seconds = {label: {name: [] for name in results[label]} for label in kernels}
    for round_index in range(rounds):
        order = list(kernels) if round_index % 2 == 0 else list(kernels)[::-1]
        for label in order:
            for name, (took, _) in calls(kernels[label], *inputs).items():
                seconds[label][name].append(took)
    now, before = (results[label] for label in kernels)
    report = {
        "ms": {
            label: {name: 1e3 * statistics.median(values) for name, values in by_name.items()}
            for label, by_name in seconds.items()
        },
        "max_difference": {
            name: max(
                (a.double() - b.double()).abs().max().item() for a, b in zip(now[name][1], before[name][1], strict=True)
            )
            for name in now
        },
    }
    if expected is not None:
        report["relative_error_vs_float64"] = {
            label: {
                name: [
                    ((a.double() - b).abs().max() / b.abs().max()).item()
                    for a, b in zip(result[name][1], expected[name], strict=True)
                ]
                for name in result
            }
            for label, result in results.items()
        }
    return report


KERNELS = {
    "persistent_read": ("persistent_read_cpu.cpp", persistent_read_cpu.COMPILE_FLAGS, persistent_read_cpu.kernel),
    "features": ("features_cpu.cpp", features_cpu.compile_flags(), features_cpu.kernel),
    "context_read": ("context_read_cpu.cpp", persistent_read_cpu.COMPILE_FLAGS, context_read_cpu.kernel),
}


def cases(kernel: str, rows: list[int], tables: torch.dtype):
    """(label, calls, inputs, float64 results or None) for each problem the kernel is timed on."""
    for n in rows:
        if kernel == "persistent_read":
            inputs = read_problem(n, tables)
            yield f"rows {n}, {str(tables).removeprefix('torch.')} tables", read_calls, inputs, read_float64(*inputs)
        elif kernel == "context_read":
            for dtype in (torch.bfloat16, torch.float32):
                inputs = context_problem(n, dtype)
                label = f"T {n // 8}, {str(dtype).removeprefix('torch.')}"
                yield label, context_calls, inputs, context_float64(*inputs)
        else:
            for dtype in (torch.bfloat16, torch.float32):
                yield f"rows {n}, {str(dtype).removeprefix('torch.')}", features_calls, features_problem(n, dtype), None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", required=True, choices=sorted(KERNELS))
    parser.add_argument("--against", required=True, help="git revision of the kernel to compare with")
    parser.add_argument("--rows", default="2048,8192", help="B x T, comma-separated (multiples of 8)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--tables",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="the persistent read's table dtype (float32, as in the model, from commit c0dd72b on)",
    )
    parser.add_argument("--json", help="where to write the result (nothing is written without it)")
    args = parser.parse_args()
    try:  # before the work, not after it
        rows = [int(value) for value in args.rows.split(",")]
        if min(rows) <= 0 or any(n % 8 for n in rows) or args.rounds <= 0 or args.threads <= 0:
            raise ValueError
    except ValueError:
        parser.error("--rows takes positive multiples of 8 separated by commas; --rounds and --threads positive")
    source, flags, current = KERNELS[args.kernel]
    try:
        if args.json:
            check_writable(args.json, "--json")
        if current() is None:
            raise MosaicError(f"the {args.kernel} kernel cannot be built or run here (see the INFO log)")
        kernels = {"working tree": current(), args.against: build_at(args.against, source, flags)}
    except MosaicError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    results = {}
    for label, calls, inputs, expected in cases(args.kernel, rows, getattr(torch, args.tables)):
        results[label] = result = compare(kernels, calls, inputs, args.rounds, expected)
        for kernel_label, by_name in result["ms"].items():
            timing = "  ".join(f"{name} {ms:7.3f} ms" for name, ms in by_name.items())
            print(f"{label:>20}  {kernel_label:>12}: {timing}")
            if expected is not None:
                errors = [
                    e for per_call in result["relative_error_vs_float64"][kernel_label].values() for e in per_call
                ]
                print(f"{'':>36}relative errors vs float64: " + ", ".join(f"{100 * e:.2f}%" for e in errors))
        print(f"{'':>36}largest difference between the two: {max(result['max_difference'].values()):.3g}")
    if args.json:
        report = {"kernel": args.kernel, "against": args.against, "rounds": args.rounds, "threads": args.threads}
        Path(args.json).write_text(json.dumps({**report, "results": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
