#!/usr/bin/env bash
# GPU checks for issue 7, in one run of under 6 minutes on one CUDA device (torch + triton installed,
# this package NOT installed: run from the repository root, PYTHONPATH=src).
#
#     OUT=/some/folder bash benchmarks/device_check.sh      # OUT defaults to /tmp/out
#
# Writes into $OUT:
#   env.txt                    nvidia-smi, torch/triton versions
#   pytest_cuda.log            the CUDA tests (Triton kernel vs reference; fast model on CUDA vs the CPU
#                              reference in float64, with and without Triton; golden vectors if present)
#                              and the CPU tests of ops/ and layers/
#   bench_cuda_triton.json     mosaic bench --device cuda: MM vs GPT vs nanoGPT, T 256/1024/4096, fp32/bf16
#   bench_cuda_torchscan.json  the same for mosaic and gpt with MOSAIC_TRITON=0 (the torch scan on CUDA)
#   leaky_cuda_triton.json, leaky_cuda_torchscan.json   leaky average fwd+bwd vs T (256 ... 65,536)
#   *.log                      each command's output
set -u
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$OUT/steps.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    >"$OUT/env.txt" 2>&1

step pytest_cuda 120 python -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/layers/test_cuda.py tests/ops tests/layers tests/models/test_golden.py

BENCH="python -m memory_mosaics.cli bench --device cuda --rounds 5 --steps-per-round 5 --warmup-steps 3"
step bench_cuda_triton 150 $BENCH --json "$OUT/bench_cuda_triton.json" --png "$OUT/bench_cuda_triton.png"
MOSAIC_TRITON=0 step bench_cuda_torchscan 50 $BENCH --models mosaic,gpt --no-memory \
    --json "$OUT/bench_cuda_torchscan.json"

step leaky_cuda_triton 20 python benchmarks/leaky_scaling.py --device cuda --repeats 10 \
    --json "$OUT/leaky_cuda_triton.json" --png "$OUT/leaky_cuda_triton.png"
MOSAIC_TRITON=0 step leaky_cuda_torchscan 20 python benchmarks/leaky_scaling.py --device cuda --repeats 10 \
    --json "$OUT/leaky_cuda_torchscan.json" --png "$OUT/leaky_cuda_torchscan.png"
echo "done; results in $OUT"
