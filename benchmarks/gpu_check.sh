#!/usr/bin/env bash
# One run on a lent GPU machine (one H200, at most 8 minutes): the CUDA tests, then benchmarks/bench_gpu.py at
# ViT-B/16 (ViT-L/16 if time is left) for MAE, CrossMAE kept 0.25, CMAE and transformers' ViTMAEForPreTraining at
# the same configuration, bf16, eager and torch.compile, SDPA and flash attention. Everything goes to $OUT
# (default ./gpu_check_out): NAME.txt per step, and summary.txt with each step's exit status and seconds.
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu   # dry run on a CPU: the same steps with tiny models, about a minute
#
# Each step runs under `timeout` (its own cap, and never past the budget), so that a hang cannot take the rest;
# a failed step is recorded and the next one runs. GPU_CHECK_BUDGET: the whole budget in seconds (default 480).
# bench_gpu.py reads the images for its loader row from MAE_TEST_DATA (default ../shared/data/imagenette2-224).
# The detection CUDA test needs pycocotools: where the image lacks it, carry its wheel and install it with
# `python -m pip` (the image's bare `pip` belongs to another interpreter); the env step says whether it is seen.
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = --device ]; then DEVICE=${2:?--device needs cuda or cpu}; fi
OUT=${OUT:-./gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET:-480}
MARGIN=10  # seconds kept back: a timed-out step gets 5 s to exit after SIGTERM, then the summary
mkdir -p "$OUT"
START=$(date +%s)
FAILED=0
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1  # a step cut short by its timeout still leaves what it printed

log() { echo "$*" | tee -a "$OUT/summary.txt"; }

# step NAME MIN CAP CMD...: CMD under `timeout` for at most CAP seconds and what the budget has left, its stdout
# and stderr into $OUT/NAME.txt; skipped when fewer than MIN seconds are left.
step() {
    local name=$1 min=$2 cap=$3
    shift 3
    local t0 left limit rc
    t0=$(date +%s)
    left=$((BUDGET - MARGIN - (t0 - START)))
    if [ "$left" -lt "$min" ]; then
        log "$name: skipped, $left s of the budget left (needs $min)"
        return
    fi
    limit=$((cap < left ? cap : left))
    echo "### $name (timeout $limit s): $*"
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
    log "$name: rc $rc$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (timed out)'), $(($(date +%s) - t0)) s"
}

gpu_state() {  # clocks, temperature and throttling: compare before and after the benchmarks
    command -v nvidia-smi > /dev/null || { echo 'no nvidia-smi'; return 0; }
    nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,clocks.max.sm,power.draw,power.limit,memory.used,\
clocks_throttle_reasons.active --format=csv 2>&1
}

env_info() {
    date -u
    git rev-parse HEAD 2>&1
    git --no-optional-locks status --short 2>&1 | head -40
    command -v nvidia-smi > /dev/null && nvidia-smi 2>&1
    gpu_state
    python -c 'import sys, importlib.metadata as md, torch
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(torch.cuda.get_device_properties(i))
for p in ("torchvision", "triton", "transformers", "timm", "numpy", "pycocotools", "flash-attn"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "absent")' 2>&1
    lscpu | grep -E '^(Model name|CPU\(s\))'
    free -g
    df -h .
}
export -f env_info gpu_state

if [ "$DEVICE" = cpu ]; then  # tiny stand-ins: pico (32 px) for ViT-B, micro (64 px) for ViT-L; no inductor
    B=pico L=small L_ATTN=sdpa COMPILE_MIN=20 COMPILE_CAP=90 TESTS_CAP=90
    export OMP_NUM_THREADS=1  # code paths, not speed: on shared cores a second OpenMP thread stalls every small op
    BENCH=(python benchmarks/bench_gpu.py --device cpu --batch_size 2 --steps 1 --warmup 1 --matmul_n 1024
           --compile_backend eager --loader_size 64 --loader_batch 8 --loader_batches 2 --loader_workers 1)
else  # each compile step compiles two or three ViT-B training steps: 36 s (ours) and 51 s (HF) each on the H200
    B=base L=large L_ATTN=sdpa,flash COMPILE_MIN=90 COMPILE_CAP=150 TESTS_CAP=${GPU_CHECK_TESTS_S:-210}
    BENCH=(python benchmarks/bench_gpu.py --device cuda --batch_size 128 --steps 20 --block 5 --warmup 3)
fi
ALL=mae,hf,cross25,cmae

log "gpu_check on $DEVICE: budget $BUDGET s, output in $OUT"
step env 0 60 bash -c env_info
step test_cuda 30 "$TESTS_CAP" python -m pytest -q tests/test_cuda.py tests/test_cuda_dense.py tests/test_cuda_ddp.py
step "bench_${B}_eager" 20 120 "${BENCH[@]}" --configs $B --attn sdpa,flash --variants $ALL
step "bench_${B}_compile_sdpa" "$COMPILE_MIN" "$COMPILE_CAP" "${BENCH[@]}" --configs $B --attn sdpa --no_loader \
    --variants mae,mae+compile,hf+compile
# ViT-L before the other compile steps: on the H200 (torch 2.11) the first compile step took 111 s, and at a budget
# of 450 s nothing after the second one ran
step "bench_${L}_eager" 40 120 "${BENCH[@]}" --configs $L --attn $L_ATTN --variants $ALL --no_loader
if [ "$DEVICE" = cpu ]; then
    log "bench_${B}_compile_sdpa_2, bench_${B}_compile_flash: not run on the CPU (the code paths of the step above)"
else
    step "bench_${B}_compile_sdpa_2" "$COMPILE_MIN" "$COMPILE_CAP" "${BENCH[@]}" --configs $B --attn sdpa \
        --no_loader --variants mae,cross25+compile,cmae+compile
    step "bench_${B}_compile_flash" "$COMPILE_MIN" "$COMPILE_CAP" "${BENCH[@]}" --configs $B --attn flash \
        --no_loader --variants mae,mae+compile,cross25+compile,cmae+compile
fi
step gpu_state_after 0 20 bash -c gpu_state
log "total $(($(date +%s) - START)) s; $FAILED step(s) failed"
[ "$FAILED" = 0 ]
