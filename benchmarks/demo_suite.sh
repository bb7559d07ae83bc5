#!/usr/bin/env bash
# The benchmark runs whose results are in the README: the embedded demo pair (SmolLM2-135M-Instruct
# + its demo LenVM) on a CPU machine, at a modest size. Results go to benchmarks/results/.
#   benchmarks/demo_suite.sh            # everything (about 1.5 hours on 2 CPU cores)
#   benchmarks/demo_suite.sh latency    # one part: latency overhead following prediction
#                                       # tradeoff tokens soak frontier onepass serving
# Timing runs (latency, overhead, soak) start their own servers and need a machine with no other load.
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/python
R=benchmarks/results
PORT=${PORT:-30123}
U=--base-url=http://127.0.0.1:$PORT
parts=${*:-latency overhead soak following prediction tradeoff tokens frontier}

serve() {  # the demo pair in the background, for the accuracy runs
  if ! curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then
    $P -m sglang_lenvm.launch_server --port "$PORT" >"$R/demo_server.log" 2>&1 &
    trap 'kill %1 2>/dev/null || true' EXIT
    until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 2; done
  fi
}

mkdir -p "$R"
for part in $parts; do
  case $part in
    latency)    $P -m benchmarks.latency --demo --max-total-tokens 32768 --concurrency 1 8 32 64 \
                  --ks 5 15 --tokens 64 --rounds 1 --max-position 512 --position-step 128 ;;
    overhead)   $P -m benchmarks.guided_overhead --tiny ;;
    soak)       $P -m benchmarks.soak --tiny --seconds 120 --clients 32 ;;
    following)  serve; $P -m benchmarks.length_following "$U" --limit 6 --concurrency 24 ;;
    prediction) serve; $P -m benchmarks.prediction "$U" --limit 12 --n 6 --max-tokens 512 \
                  --concurrency 24 ;;
    tradeoff)   serve; $P -m benchmarks.tradeoff "$U" --level easy --problems 12 --n 2 \
                  --max-tokens 192 --budgets 16 32 48 64 96 128 192 --concurrency 24 \
                  --out $R/tradeoff_guard.json ;;
    tokens)     serve; $P -m benchmarks.length_tokens "$U" --limit 12 --n 2 --max-tokens 192 ;;
    frontier)   F="$P -m benchmarks.decision_frontier --demo --max-total-tokens 65536"
                # Every row up to the sentence-end ones ran before that rule existed.
                OFF="--server-arg=--lenvm-sentence-end --server-arg=off"
                $F $OFF --limit 12 --targets 16 64 128 --modes equal --rules 0:inf 0.1:inf 0.1:4 \
                  --out $R/decision_frontier_equal.json
                $F $OFF --limit 12 --targets 16 64 128 --modes equal --append --rules 0.2:inf 0.1:8 \
                  0.15:inf 0.1:16 --out $R/decision_frontier_equal.json
                $F $OFF --limit 6 --targets 16 64 --modes at_most at_least --rules 0:inf:0 0.1:16:1 \
                  --out $R/decision_frontier_bounds.json
                $F $OFF --lifebench "${LIFEBENCH:?set LIFEBENCH to data_lite_no_summary.jsonl}" \
                  --limit 6 --targets 16 64 128 --modes equal --rules 0:inf 0.1:16 \
                  --server-arg=--lenvm-repeat-ngram --server-arg=0 \
                  --out $R/decision_frontier_lifebench_equal.json
                # The repetition guard, on (3 x 2, the default) and off, appended per mode.
                G="--limit 12 --targets 16 64 128 --server-arg=--lenvm-repeat-ngram"
                $F $OFF $G --server-arg=3 --modes equal --append --rules 0.1:16 \
                  --out $R/decision_frontier_equal.json
                $F $OFF $G --server-arg=0 --modes at_least --rules 0.1:16:1:2 \
                  --out $R/decision_frontier_at_least.json
                $F $OFF $G --server-arg=3 --modes at_least --append --rules 0.1:16:1:2 \
                  --out $R/decision_frontier_at_least.json
                $F $OFF $G --server-arg=3 --modes at_most --append --rules 0.1:16:1:2 \
                  --out $R/decision_frontier_at_most.json
                # The default, every request 3 times: the noise of one row.
                $F $OFF --limit 12 --targets 16 64 128 --modes equal --samples 3 --rules 0.1:16:1:2 \
                  --out $R/decision_frontier_equal_samples.json
                $F $OFF --lifebench "$LIFEBENCH" --limit 6 --targets 16 64 128 --modes equal \
                  --samples 3 --rules 0.1:16:1:2 \
                  --out $R/decision_frontier_lifebench_equal_samples.json
                # Sentence ends (--lenvm-sentence-end on, the default from 2026-12-07): the
                # rows above ran without it; these append the same runs with it.
                $F --limit 12 --targets 16 64 128 --modes equal --samples 3 --append \
                  --rules 0.1:16:1:2 --out $R/decision_frontier_equal_samples.json
                $F $G --server-arg=3 --modes at_most --append --rules 0.1:16:1:2 \
                  --out $R/decision_frontier_at_most.json
                $F --lifebench "$LIFEBENCH" --limit 6 --targets 16 64 128 --modes equal \
                  --samples 3 --append --rules 0.1:16:1:2 \
                  --out $R/decision_frontier_lifebench_equal_samples.json ;;
    onepass)    O="--server-arg=--lenvm-scoring --server-arg=one-pass"
                $P -m benchmarks.latency --demo $O --no-plain --max-total-tokens 32768 \
                  --concurrency 1 8 32 --ks 5 15 --tokens 64 --rounds 1 --max-position 0 \
                  --out $R/latency_one_pass.json
                $P -m benchmarks.latency --demo $O --server-arg=--lenvm-shared-trunk \
                  --server-arg=off --no-plain --max-total-tokens 32768 --concurrency 8 --ks 15 \
                  --tokens 64 --rounds 1 --max-position 0 --out $R/latency_one_pass_no_trunk.json
                $P -m benchmarks.latency --demo --no-plain --max-total-tokens 32768 \
                  --concurrency 8 --ks 5 15 --tokens 64 --rounds 1 --max-position 0 \
                  --out $R/latency_star_same_day.json
                $P -m benchmarks.length_following --demo $O --limit 6 --targets 32 64 128 \
                  --runs lenvm --max-total-tokens 32768 --out $R/length_following_one_pass.json
                $P -m benchmarks.length_following --demo --limit 6 --targets 32 64 128 \
                  --runs lenvm --max-total-tokens 32768 \
                  --out $R/length_following_star_same_set.json ;;
    serving)    $P -m benchmarks.bench_serving_ratio --demo --max-total-tokens 32768 \
                  --concurrency 8 --ks 5 15 --num-prompts 32 ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
