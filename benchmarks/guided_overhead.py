"""What guided decoding costs per step, and what a loaded LenVM costs unguided traffic.

    python -m benchmarks.guided_overhead --tiny            # tiny random models built on the fly
    python -m benchmarks.guided_overhead --model-path BASE --lenvm-path LENVM   # or --demo

Starts the servers itself (one at a time: an idle SGLang scheduler on a CPU spins on a core, so
two servers side by side would slow each other) and measures:

1. Step time by generated position, one request at a time: unguided vs guided (at_least, so
   the request cannot stop early) for K = 5 and 15 candidates. The LenVM reads its prefix KV
   from its own cache (no recompute), so its per-step work should not grow with the position.
   Step times come from the scheduler itself: with `--decode-log-interval N` SGLang logs the
   decode throughput of the last N steps, and with one request running that is 1 / step time
   at a known position (#token - prompt tokens). Client-side streaming times are not used:
   the HTTP stream falls behind a fast model (chunks then arrive in bursts) and its per-chunk
   cost grows with the text, which would be measured instead of the step.
   (SGLang's Prometheus endpoint has no per-step time at a known position: its
   `sglang:gen_throughput` is the same number as a gauge, which a client can only sample.)
   Reported: the median step time of the log windows within --window tokens of each
   position, pooled over --repeats requests, and the far / near ratio; beside it, from the
   LenVM's own Prometheus histogram (`sglang:lenvm_step_seconds`, the server runs with
   --enable-metrics), the LenVM's mean host time per scored step over those requests.
2. Output throughput (tokens / wall second) of unguided requests at --concurrency on our
   server with the LenVM loaded and on plain `sglang.launch_server` with the same base model,
   and of guided requests (K = 5, 15) on our server. The servers alternate for --rounds
   rounds (ours, plain, ours, plain, ...) so that drift in the machine's speed hits both;
   each round takes --repeats measurements. Ratios are of the medians over all measurements;
   every measurement is in the JSON.
Writes JSON (--out) and prints a markdown table. All numbers are measured, with the machine.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

import requests

from benchmarks.client import lenvm_metrics, throughput
from benchmarks.reporting import header, write_json
from benchmarks.servers import model_paths
from sglang_lenvm.testing.server_process import Server

DECODE_LOG = re.compile(r"Decode batch, #running-req: (\d+), #token: (\d+),.*"
                        r"gen throughput \(token/s\): ([\d.]+)")


def step_times(log_path: Path, offset: int, prompt_tokens: int) -> list[tuple[int, float]]:
    """(generated position, seconds per step) from the decode log lines after `offset`, for
    windows where exactly one request was running."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        text = f.read()
    out = []
    for running, tokens, tput in DECODE_LOG.findall(text):
        if int(running) == 1 and float(tput) > 0:
            out.append((int(tokens) - prompt_tokens, 1.0 / float(tput)))
    return out


def position_profile(srv: Server, body: dict, positions: list[int], window: int,
                     repeats: int) -> dict:
    samples = []
    before = lenvm_metrics(srv.url)
    for _ in range(repeats):
        offset = srv.log_path.stat().st_size
        r = requests.post(srv.url + "/v1/completions", json=body, timeout=3600)
        r.raise_for_status()
        samples += step_times(srv.log_path, offset, r.json()["usage"]["prompt_tokens"])
    after = lenvm_metrics(srv.url)
    count, total = (("sglang:lenvm_step_seconds_" + x, "scoring") for x in ("count", "sum"))
    steps = after.get(count, 0) - before.get(count, 0)
    seconds = after.get(total, 0) - before.get(total, 0)
    out = {}
    for p in positions:
        near = [s for pos, s in samples if abs(pos - p) <= window]
        if not near:
            raise RuntimeError(f"no decode log window near position {p}: is "
                               f"--decode-log-interval smaller than --window?")
        out[str(p)] = statistics.median(near)
    out["windows"] = len(samples)
    out["lenvm_scoring_s_per_step"] = seconds / steps if steps else None
    out["lenvm_scored_steps"] = steps
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--model-path")
    ap.add_argument("--lenvm-path")
    ap.add_argument("--tiny", action="store_true", help="build tiny random models")
    ap.add_argument("--demo", action="store_true", help="the embedded demo pair")
    ap.add_argument("--positions", type=int, nargs=2, default=[50, 1000])
    ap.add_argument("--window", type=int, default=40)
    ap.add_argument("--decode-log-interval", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per throughput request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two servers")
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 15])
    ap.add_argument("--prompt", default="Write a long story about a lighthouse keeper.")
    ap.add_argument("--max-total-tokens", type=int, default=65536)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for both servers (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/guided_overhead.json")
    args = ap.parse_args(argv)
    base, lenvm, models_tmp = model_paths(args, ap)  # models_tmp: keep the tiny models alive
    tmp = tempfile.TemporaryDirectory()

    far = args.positions[1] + args.window + 1
    result = {**header(args), "step_s": {}, "throughput_tok_s": {}, "throughput_samples": {}}
    logs = Path(tmp.name)
    common = ["--model-path", base, "--decode-log-interval", str(args.decode_log_interval),
              *args.server_arg]
    tp_body = {"model": "m", "prompt": args.prompt, "temperature": 1.0,
               "max_tokens": args.tokens, "ignore_eos": True}
    tp_runs = {"unguided_with_lenvm": tp_body}
    for k in args.ks:
        tp_runs[f"guided_k{k}"] = {k2: v for k2, v in tp_body.items() if k2 != "ignore_eos"} | {
            "top_k": k, "length_target": args.tokens, "length_mode": "at_least"}
    samples = {name: [] for name in [*tp_runs, "plain_sglang"]}

    for rnd in range(args.rounds):
        with Server(common + ["--lenvm-path", lenvm, "--enable-metrics"],
                    logs / f"lenvm{rnd}.log", max_total_tokens=args.max_total_tokens) as srv:
            if rnd == 0:
                pos_body = {"model": "m", "prompt": args.prompt, "temperature": 1.0,
                            "max_tokens": far}
                runs = {"unguided": {**pos_body, "ignore_eos": True}}
                for k in args.ks:
                    runs[f"guided_k{k}"] = {**pos_body, "top_k": k, "length_target": far,
                                            "length_mode": "at_least"}
                for name, body in runs.items():
                    prof = position_profile(srv, body, args.positions, args.window, args.repeats)
                    p0, p1 = (prof[str(p)] for p in args.positions)
                    result["step_s"][name] = {**prof, "ratio_far_near": p1 / p0}
            for name, body in tp_runs.items():
                samples[name] += [throughput(srv.url, body, args.concurrency, 1)
                                  for _ in range(args.repeats)]
        with Server(common, logs / f"plain{rnd}.log", module="sglang.launch_server",
                    max_total_tokens=args.max_total_tokens) as plain:
            samples["plain_sglang"] += [throughput(plain.url, tp_body, args.concurrency, 1)
                                        for _ in range(args.repeats)]

    tp = {name: statistics.median(v) for name, v in samples.items()}
    result["throughput_tok_s"], result["throughput_samples"] = tp, samples
    result["ratios"] = {"unguided_with_lenvm_vs_plain": tp["unguided_with_lenvm"] / tp["plain_sglang"]}
    for k in args.ks:
        result["ratios"][f"guided_k{k}_vs_unguided"] = tp[f"guided_k{k}"] / tp["unguided_with_lenvm"]
    write_json(args.out, result)
    print(report(result))
    return result


def report(r: dict) -> str:
    p0, p1 = r["settings"]["positions"]
    lines = [f"Machine: {r['machine']['cpu']} ({r['machine']['cpu_count']} cores), "
             f"GPU: {r['machine']['gpu']}, sglang {r['machine']['sglang']}", "",
             f"| run (one request) | ms/step @ {p0} | ms/step @ {p1} | ratio "
             f"| LenVM ms/scored step (metrics) |", "|---|---|---|---|---|"]
    for name, v in r["step_s"].items():
        lenvm = v.get("lenvm_scoring_s_per_step")
        lines.append(f"| {name} | {v[str(p0)] * 1e3:.2f} | {v[str(p1)] * 1e3:.2f} | "
                     f"{v['ratio_far_near']:.2f} | "
                     f"{'-' if lenvm is None else f'{lenvm * 1e3:.2f}'} |")
    lines += ["", f"| throughput (concurrency {r['settings']['concurrency']}) | tok/s (median) "
              f"| min–max |", "|---|---|---|"]
    for name, v in r["throughput_tok_s"].items():
        s = r["throughput_samples"][name]
        lines.append(f"| {name} | {v:.1f} | {min(s):.0f}–{max(s):.0f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for name, v in r["ratios"].items():
        lines.append(f"| {name} | {v:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
