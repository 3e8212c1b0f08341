#!/usr/bin/env bash
# Runs every comparison of the performance issue, one at a time (anything else on
# the cores distorts the figures), writing JSON under bench-results/.
# vLLM must be installed in .venv-vllm (see ../shared/peers/vllm-cpu.md).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}; mkdir -p "$OUT"
B=".venv/bin/orca-serve"
N=${N:-128}
MODEL_DIR=$($B bench hf-dir 2>/dev/null | tail -1)
# Wait for a server's /health, giving up if its process ($2) dies.
wait_up() { for _ in $(seq 1 600); do curl -sf "$1/health" >/dev/null && return 0
  kill -0 "$2" 2>/dev/null || return 1; sleep 1; done; return 1; }
# STEPS="overhead engine http vllm lowc hf sweep swap" picks what to run (default: all);
# REPEATS (default 3) runs of engine, http, vllm and lowc are compared by their medians.
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }

step() { echo "== $(date +%T) $*"; }

want overhead && step "overhead at 256 running requests (null model vs model)" && $B bench overhead --num-requests 256 --prompt-len 128 --steps 10 --out "$OUT/overhead.json"

REPEATS=${REPEATS:-3}

# Our in-process engine, our server and vLLM's, alternated run by run so drift
# on this shared machine hits all three (the HTTP/in-process ratio as much as
# the ratio to vLLM); each server starts fresh for each run (no prefix cache
# carried over).
# ours_server/vllm_server CMD...: start the server, run CMD... against it
# (PORT says where), stop it.
ours_server() {
  $B --log-level warning serve --port 8100 > "$OUT/ours-serve.log" 2>&1 & PID=$!
  PORT=8100; wait_up http://127.0.0.1:$PORT $PID && "$@"
  kill -INT $PID; wait $PID
}
vllm_server() {
  HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 \
    .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --dtype float32 --max-model-len 2048 --port 8101 \
    --served-model-name SmolLM2-135M-Instruct > "$OUT/vllm-serve.log" 2>&1 & PID=$!
  PORT=8101; wait_up http://127.0.0.1:$PORT $PID && "$@"
  kill -INT $PID; wait $PID
}
http_bench() { $B bench --backend openai --base-url "http://127.0.0.1:$PORT" --tokenizer "$MODEL_DIR" --no-progress --quiet "$@"; }
# The 128-request trace, all sent at t=0. Args: file prefix, label, run.
trace_run() { http_bench --workload orca --num-requests "$N" --label "$2" --out "$OUT/$1-http-$3.json"; }
# A few users at a time: 256-token prompts, 128 output tokens. LOWC lists
# concurrency:requests pairs (default one user for 8 requests, then four
# for 16, then sixteen for 32). Args as trace_run.
LOWC=${LOWC:-1:8 4:16 16:32}
lowc_run() {
  for level in $LOWC; do
    local users=${level%%:*} requests=${level#*:}
    http_bench --workload random --input-len 256 --output-len 128 --num-requests "$requests" \
      --max-concurrency "$users" --label "$2" --out "$OUT/$1-lowc-c$users-$3.json"
  done
}
have_vllm() { [ -x .venv-vllm/bin/python ]; }
for i in $(seq 1 "$REPEATS"); do
  want engine && step "orca-serve offline (in-process engine), $N requests, run $i/$REPEATS" &&
    $B bench --workload orca --num-requests "$N" --label orca-serve-engine --out "$OUT/ours-engine-$i.json" --no-progress --quiet
  want http && step "orca-serve server through HTTP, run $i/$REPEATS" && ours_server trace_run ours orca-serve "$i"
  want vllm && have_vllm && step "vLLM CPU server through HTTP, run $i/$REPEATS" && vllm_server trace_run vllm vllm "$i"
done
want engine && $B bench roofline --num-tokens 128 --result "$OUT"/ours-engine-*.json --out "$OUT/roofline.json"
if want http && want vllm && have_vllm; then
  $B bench compare --median "$OUT"/ours-http-*.json "$OUT"/vllm-http-*.json --baseline vllm --out "$OUT/vs-vllm.json"
fi
if want http && want engine; then
  $B bench compare --median "$OUT"/ours-http-*.json "$OUT"/ours-engine-*.json --baseline orca-serve-engine \
    --out "$OUT/http-vs-engine.json"
fi

if want lowc && have_vllm; then
for i in $(seq 1 "$REPEATS"); do
  step "low concurrency ($LOWC: users at a time:requests) over HTTP, orca-serve then vLLM, run $i/$REPEATS"
  ours_server lowc_run ours orca-serve "$i"
  vllm_server lowc_run vllm vllm "$i"
done
for level in $LOWC; do
  users=${level%%:*}
  $B bench compare --median "$OUT"/ours-lowc-c$users-*.json "$OUT"/vllm-lowc-c$users-*.json --baseline vllm \
    --out "$OUT/vs-vllm-lowc-c$users.json"
done
fi

# HF_REPEATS (default 1) runs of ours and hf-static, alternated, compared by
# their medians; hf-cb (several minutes a run) runs once.
if want hf; then
HF_N=${HF_N:-64}
HF_REPEATS=${HF_REPEATS:-1}
for i in $(seq 1 "$HF_REPEATS"); do
  step "Hugging Face transformers static batches, $HF_N requests, with ours on the same trace, run $i/$HF_REPEATS"
  $B bench --workload orca --num-requests "$HF_N" --label orca-serve-engine --out "$OUT/hf-trace-ours-$i.json" --no-progress --quiet
  $B bench --backend hf-static --hf-batch-sizes ${HF_BATCH_SIZES:-16,32,64} --workload orca --num-requests "$HF_N" \
    --label hf-static --out "$OUT/hf-static-$i.json" --no-progress --quiet
done
step "Hugging Face transformers continuous batching, $HF_N requests"
$B bench --backend hf-cb --workload orca --num-requests "$HF_N" --label hf-cb --out "$OUT/hf-cb.json" --no-progress --quiet
$B bench compare --median "$OUT"/hf-trace-ours-*.json "$OUT"/hf-static-*.json --baseline hf-static --out "$OUT/vs-hf-static.json"
$B bench compare --median "$OUT"/hf-trace-ours-*.json "$OUT/hf-cb.json" --baseline hf-cb --out "$OUT/vs-hf-cb.json"
fi

if want sweep; then
step "request-level baseline vs iteration-level, Poisson rate sweep"
# --max-batch-size is the baseline's batch; SWEEP_MAX_NUM_SEQS=16 caps ours the same (default: its 256).
# SWEEP_TPOT_SLO_S=0.15 adds the slo policy, keeping that time per output token (the others only count it).
$B bench --scheduling-policy fcfs${SWEEP_TPOT_SLO_S:+,slo},request-level --max-batch-size 16 \
  ${SWEEP_MAX_NUM_SEQS:+--max-num-seqs $SWEEP_MAX_NUM_SEQS} ${SWEEP_TPOT_SLO_S:+--default-tpot-slo-s $SWEEP_TPOT_SLO_S} \
  --workload orca --num-requests ${SWEEP_N:-32} --rates ${RATES:-0.15,0.3,0.6,0.9,1.8} --slo-normalized-latency-ms ${SLO_NL:-250} --out "$OUT/sweep.json" \
  --plot "$OUT/sweep.png" --no-progress --quiet
$B bench compare "$OUT/sweep.json" --baseline request-level --out "$OUT/vs-request-level.json"
fi

if want swap; then
step "preemption by recompute vs swap on a memory-bound pool"
for mode in recompute swap; do
  $B bench --workload orca --num-requests ${SWAP_N:-64} --num-kv-blocks ${SWAP_BLOCKS:-400} --preemption-mode $mode \
    --no-enable-prefix-caching --label $mode --out "$OUT/preempt-$mode.json" --no-progress --quiet
done
fi
step done
