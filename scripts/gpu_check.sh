#!/usr/bin/env bash
# The checks and figures that need a CUDA GPU, which CI does not have. Run it
# from the repository root on a machine with one GPU, torch built for CUDA
# (with its Triton) and transformers installed (the HTTP server's packages are
# not needed):
#
#   OUT=gpu-results scripts/gpu_check.sh
#
# 1. Correctness: the engine-level greedy-parity tests, with the engine on the
#    GPU (device "auto" takes it) in float32 and HF on the CPU: continuous
#    batching with staggered arrivals, both KV allocation modes, recompute and
#    swap preemption (pinned CPU pool), prefix caching, priority preemption;
#    the decode graphs captured and replayed, with and without the Triton paged
#    decode kernel; that kernel compiled, against its reference in float32,
#    float16 and bfloat16.
# 2. Figures: a dummy-weight GPT-3 1.3B in bfloat16 on the orca trace (128
#    requests at t=0): ours with the Triton decode kernel (the default), ours
#    with it and --cuda-graphs, with both and --async-scheduling, ours gathering K/V for SDPA (--triton-decode
#    off, the layout of the first GPU run), HF transformers' static batches on
#    the same GPU; the GPU's GEMM/bandwidth roofline with our fraction.
# 3. Where an iteration's time goes: scripts/profile_steps.py (wall time per
#    step against device kernel time, ops dispatched per decode step), eager
#    and with decode graphs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
MODEL=${MODEL:-"--load-format dummy --dummy-config gpt3-1.3b --dtype bfloat16"}
REQUESTS=${REQUESTS:-128}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu dry-runs the script where there is no GPU
# The KV pool per GPU; unset: what --gpu-memory-utilization (0.9) leaves after a profile run.
KV=${KV_GB:+--kv-cache-memory-gb $KV_GB}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

echo "== 1. greedy parity with the engine on the GPU"
# Left out: the SmolLM2 test (its GGUF package is not on a GPU image) and the
# one that demands the native CPU kernels.
$PY -m pytest -p no:cacheprovider tests/test_engine_correctness.py tests/test_triton_decode.py \
    tests/test_decode_graphs.py tests/test_kv_sizing.py tests/test_async_scheduling.py \
    -k "not smollm2 and not one_users" 2>&1 | tee "$OUT/pytest.log" || status=1

echo "== 2. GPT-3 1.3B (dummy weights, bfloat16): ours, HF static batches, the roofline"
bench() {  # bench NAME FLAGS...: one run of the trace, saved as $OUT/NAME.json
    local name=$1
    shift
    # shellcheck disable=SC2086
    $PY -m orca_serve.bench $MODEL --device "$DEVICE" --num-requests "$REQUESTS" --no-progress --label "$name" \
        --out "$OUT/$name.json" "$@" 2>&1 | tee -a "$OUT/bench.log" || status=1
}
: > "$OUT/bench.log"
# shellcheck disable=SC2086
bench ours $KV
# CUDA graphs need a GPU: a DEVICE=cpu dry run skips them.
# shellcheck disable=SC2086
[ "$DEVICE" = cuda ] && bench ours-graphs $KV --cuda-graphs
# ... and the next iteration scheduled and launched while one runs.
# shellcheck disable=SC2086
[ "$DEVICE" = cuda ] && bench ours-async-graphs $KV --cuda-graphs --async-scheduling
bench hf-static --backend hf-static --hf-batch-sizes 32,128
# shellcheck disable=SC2086
bench ours-gather $KV --triton-decode off
for name in ours ours-graphs ours-async-graphs ours-gather; do
    [ -f "$OUT/$name.json" ] || continue
    $PY -m orca_serve.bench compare "$OUT/$name.json" "$OUT/hf-static.json" 2>&1 | tee -a "$OUT/bench.log" \
        || status=1
done
# shellcheck disable=SC2086
$PY -m orca_serve.bench roofline $MODEL --device "$DEVICE" --rounds 2 --round-gap 1 --result "$OUT/ours.json" \
    --out "$OUT/roofline.json" 2>&1 | tee -a "$OUT/bench.log" || status=1
echo "== 3. one iteration's time: wall against kernels"
for graphs in --no-cuda-graphs $([ "$DEVICE" = cuda ] && echo --cuda-graphs); do
    $PY scripts/profile_steps.py --dummy-config "${PROFILE_MODEL:-gpt3-1.3b}" --dtype bfloat16 --device "$DEVICE" \
        $graphs 2>&1 | tee -a "$OUT/profile.txt" || status=1
done
exit $status
