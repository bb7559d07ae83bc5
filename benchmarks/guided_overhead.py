"""What guided decoding costs per step, and what a loaded LenVM costs unguided traffic.

    python -m benchmarks.guided_overhead --tiny            # tiny random models built on the fly
    python -m benchmarks.guided_overhead --model-path BASE --lenvm-path LENVM

Starts the servers itself and measures, over the OpenAI API:
1. Inter-token latency by generated position (streamed, one request at a time): unguided vs
   guided (at_least, so the request cannot stop early), for K = 5 and 15 candidates. The LenVM
   reads its prefix KV from its own cache (no recompute), so its per-step work should not
   grow with the position: we report the latency near `--positions` and their ratio.
2. Output throughput of unguided requests at a given concurrency on (a) our server with the
   LenVM loaded and (b) plain `sglang.launch_server` on the same base model; and of guided
   requests (K = 5, 15) on our server. Ratios are of numbers measured in the same run.
Writes JSON (--out) and prints a markdown table. All numbers are measured, with the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import (build_tiny, latency_at, machine_info, stream_token_times,
                               throughput)
from sglang_lenvm.server_process import Server


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--lenvm-path")
    ap.add_argument("--tiny", action="store_true", help="build tiny random models")
    ap.add_argument("--positions", type=int, nargs=2, default=[50, 1000])
    ap.add_argument("--window", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per throughput request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 15])
    ap.add_argument("--prompt", default="Write a long story about a lighthouse keeper.")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for both servers (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/guided_overhead.json")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if args.tiny:
        base, lenvm = build_tiny(Path(tmp.name))
    elif args.model_path and args.lenvm_path:
        base, lenvm = args.model_path, args.lenvm_path
    else:
        ap.error("give --tiny, or --model-path and --lenvm-path")

    far = args.positions[1] + args.window + 1
    result = {"machine": machine_info(), "settings": vars(args), "latency_s": {},
              "throughput_tok_s": {}}
    logs = Path(tmp.name)
    common = ["--model-path", base, *args.server_arg]
    with Server(common + ["--lenvm-path", lenvm], logs / "lenvm.log",
                max_total_tokens=65536) as srv:
        base_body = {"model": "m", "prompt": args.prompt, "temperature": 1.0, "max_tokens": far}
        runs = {"unguided": {**base_body, "ignore_eos": True}}
        for k in args.ks:
            runs[f"guided_k{k}"] = {**base_body, "top_k": k, "length_target": far,
                                    "length_mode": "at_least"}
        for name, body in runs.items():
            times = stream_token_times(srv.url, body)
            lat = {p: latency_at(times, p, args.window) for p in args.positions}
            result["latency_s"][name] = {str(p): v for p, v in lat.items()}
            result["latency_s"][name]["ratio_far_near"] = lat[args.positions[1]] / lat[args.positions[0]]
        tp_body = {"model": "m", "prompt": args.prompt, "temperature": 1.0,
                   "max_tokens": args.tokens, "ignore_eos": True}
        result["throughput_tok_s"]["unguided_with_lenvm"] = throughput(
            srv.url, tp_body, args.concurrency, args.repeats)
        for k in args.ks:
            body = {**tp_body, "top_k": k, "length_target": args.tokens, "length_mode": "at_least"}
            body.pop("ignore_eos")
            result["throughput_tok_s"][f"guided_k{k}"] = throughput(
                srv.url, body, args.concurrency, args.repeats)
    with Server(common, logs / "plain.log", module="sglang.launch_server",
                max_total_tokens=65536) as plain:
        result["throughput_tok_s"]["plain_sglang"] = throughput(
            plain.url, tp_body, args.concurrency, args.repeats)
    tp = result["throughput_tok_s"]
    result["ratios"] = {"unguided_with_lenvm_vs_plain": tp["unguided_with_lenvm"] / tp["plain_sglang"]}
    for k in args.ks:
        result["ratios"][f"guided_k{k}_vs_unguided"] = tp[f"guided_k{k}"] / tp["unguided_with_lenvm"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(report(result))
    return result


def report(r: dict) -> str:
    p0, p1 = r["settings"]["positions"]
    lines = [f"Machine: {r['machine']['cpu']} ({r['machine']['cpu_count']} cores), "
             f"GPU: {r['machine']['gpu']}, sglang {r['machine']['sglang']}", "",
             f"| run | ms/token @ {p0} | ms/token @ {p1} | ratio |", "|---|---|---|---|"]
    for name, v in r["latency_s"].items():
        lines.append(f"| {name} | {v[str(p0)] * 1e3:.2f} | {v[str(p1)] * 1e3:.2f} | "
                     f"{v['ratio_far_near']:.2f} |")
    lines += ["", f"| throughput (concurrency {r['settings']['concurrency']}) | tok/s |", "|---|---|"]
    for name, v in r["throughput_tok_s"].items():
        lines.append(f"| {name} | {v:.1f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for name, v in r["ratios"].items():
        lines.append(f"| {name} | {v:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
