#!/usr/bin/env bash
# GPU checks for issue 7 on one CUDA device (torch + triton installed, this package not installed: run
# from the repository root; PYTHONPATH=src is set here). At most 4 minutes: each step has its own limit.
#
#     OUT=/some/folder bash benchmarks/device_check.sh      # OUT defaults to /tmp/out
#
# The golden vectors live outside the repository (../shared/reference/golden); where they are absent,
# a copy in build/shared_golden (cp -r ../shared/reference/golden build/shared_golden, carried along)
# is put there, else the golden test skips.
#
# Writes into $OUT:
#   env.txt                    nvidia-smi, torch/triton versions
#   pytest_cuda.log            the CUDA tests: Triton kernel vs reference (outputs, gradients; also in
#                              Triton's interpreter); fast model on CUDA vs the CPU reference in float64,
#                              with and without Triton; the golden vectors on CUDA if ../shared has them
#   bench_cuda_triton_T{256,1024,4096}.json   mosaic bench --device cuda: MM vs GPT vs nanoGPT, fp32/bf16
#   bench_cuda_torchscan.json  mosaic and gpt with MOSAIC_TRITON=0 (the torch scan on CUDA), all T
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

if [ ! -d ../shared/reference/golden ] && [ -d build/shared_golden ]; then
    mkdir -p ../shared/reference && cp -r build/shared_golden ../shared/reference/golden
fi
{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    >"$OUT/env.txt" 2>&1

step pytest_cuda 60 python -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/layers/test_cuda.py tests/ops/test_leaky_average_triton.py

BENCH="python -m memory_mosaics.cli bench --device cuda --rounds 3 --steps-per-round 3 --warmup-steps 2"
for T in 256 1024 4096; do  # one process per length, so that a time-out loses one length only
    step "bench_cuda_triton_T$T" 40 $BENCH --lengths $T --json "$OUT/bench_cuda_triton_T$T.json"
done
MOSAIC_TRITON=0 step bench_cuda_torchscan 40 $BENCH --models mosaic,gpt --no-memory \
    --json "$OUT/bench_cuda_torchscan.json"

step leaky_cuda_triton 15 python benchmarks/leaky_scaling.py --device cuda --repeats 5 \
    --json "$OUT/leaky_cuda_triton.json" --png "$OUT/leaky_cuda_triton.png"
MOSAIC_TRITON=0 step leaky_cuda_torchscan 15 python benchmarks/leaky_scaling.py --device cuda --repeats 5 \
    --json "$OUT/leaky_cuda_torchscan.json" --png "$OUT/leaky_cuda_torchscan.png"
echo "done; results in $OUT"
