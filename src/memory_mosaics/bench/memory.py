"""Peak memory of a training step, measured in a fresh process per model.

On CPU there is no allocator counter to ask, so each (model, length, dtype) runs in its own Python
process, started with MALLOC_MMAP_THRESHOLD_=65536 so that glibc hands every freed block of 64 KiB or
more straight back to the operating system and the resident set size (RSS) follows the live tensors.
The process builds the model and its AdamW optimiser and runs one warm-up step (AdamW's state, the
kernels' one-time set-up) and lets go of the buffers an operator keeps from step to step (the float32
persistent read's kept weights: the measured step allocates them again); then it resets the kernel's RSS
high-water mark (/proc/self/clear_refs), reads the RSS, runs one more step and reads the high-water mark
(VmHWM). `step_peak_bytes` = VmHWM - RSS before the step: gradients, activations saved for backward and
temporaries — what grows with the sequence. `peak_bytes` is the process's VmHWM over that step (Python,
torch, weights included). On CUDA the same steps run in-process and `torch.cuda.max_memory_allocated` gives the peak.

Optionally (`largest=True`) a dispatch mode records the largest tensor any operator returned during
the measured step: the proof that a long-context step builds no T x T tensor (kernels' private
scratch, such as the fused attention's blocks, is not seen; that is attention's own need).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _status_bytes(field: str) -> int:
    """A size from /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


class LargestTensor(TorchDispatchMode):
    """Remembers the largest tensor returned by any operator (numel, shape, operator)."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape, self.op = 0, (), ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.shape, self.op = tensor.numel(), tuple(tensor.shape), str(func)
        return out


def measure_here(settings, name: str, length: int, dtype: str, largest: bool = False) -> dict:
    """Build the model and run two steps in this process; returns the memory figures."""
    from memory_mosaics.bench.throughput import build_model, training_step
    from memory_mosaics.ops import persistent_read_cpu

    if settings.threads:
        torch.set_num_threads(settings.threads)
    cuda = settings.device.startswith("cuda")
    model = build_model(name, settings, length)
    step = training_step(model, settings, length, dtype)
    step()  # warm-up: optimiser state, one-time kernel set-up
    # Buffers that the step's own operators keep from step to step (the float32 persistent read's softmax
    # weights, reused rather than faulted in again) are the step's memory: let them go, so that the measured
    # step allocates them again and its peak counts them.
    persistent_read_cpu.KEPT_WEIGHTS.clear()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_high_water_mark()
        before = _status_bytes("VmRSS")
    mode = LargestTensor() if largest else None
    start = time.perf_counter()
    with mode if mode is not None else nullcontext():
        step()
    seconds = time.perf_counter() - start
    if cuda:
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated, in-process"
    else:
        peak, method = _status_bytes("VmHWM"), "VmHWM after a reset, fresh process, MALLOC_MMAP_THRESHOLD_=65536"
    result = {
        "peak_bytes": peak,
        "before_step_bytes": before,
        "step_peak_bytes": peak - before,
        "memory_method": method,
        "probe_step_seconds": seconds,
    }
    if mode is not None:
        result.update(largest_tensor_numel=mode.numel, largest_tensor_shape=list(mode.shape), largest_tensor_op=mode.op)
    return result


def peak_memory(settings, name: str, length: int, dtype: str, largest: bool = False, timeout: float = 3600) -> dict:
    """`measure_here` in a fresh Python process on CPU (so that peaks of other models do not count)."""
    if settings.device.startswith("cuda"):
        return measure_here(settings, name, length, dtype, largest)
    command = [
        sys.executable,
        "-m",
        "memory_mosaics.bench.memory",
        json.dumps(dataclasses.asdict(settings)),
        name,
        str(length),
        dtype,
    ] + (["--largest"] if largest else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {name} T={length} {dtype} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from memory_mosaics.bench.throughput import ThroughputSettings

    parser = argparse.ArgumentParser(description="one memory probe (run by peak_memory)")
    parser.add_argument("settings")
    parser.add_argument("model")
    parser.add_argument("length", type=int)
    parser.add_argument("dtype")
    parser.add_argument("--largest", action="store_true")
    args = parser.parse_args(argv)
    fields = json.loads(args.settings)
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()}
    settings = ThroughputSettings(**fields)
    print(json.dumps(measure_here(settings, args.model, args.length, args.dtype, args.largest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
