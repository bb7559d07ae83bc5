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
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sglang_lenvm.server_process import Server


def machine_info() -> dict:
    import torch

    import sglang

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "sglang": sglang.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def stream_token_times(url: str, body: dict) -> list[tuple[float, int]]:
    """(arrival time, completion tokens so far) per streamed chunk."""
    body = {**body, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    out = []
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or {}
            if usage.get("completion_tokens"):
                out.append((time.perf_counter(), usage["completion_tokens"]))
    return out


def latency_at(times: list[tuple[float, int]], position: int, window: int) -> float:
    """Seconds per token between positions position - window and position + window.

    Streamed chunks can carry several tokens, so the rate is taken between the first chunks
    that reach the two positions rather than chunk by chunk.
    """
    def first_at(n):
        return next(((t, m) for t, m in times if m >= n), None)

    a, b = first_at(position - window), first_at(position + window)
    if a is None or b is None or b[1] <= a[1]:
        raise RuntimeError(f"not enough tokens streamed around position {position}")
    return (b[0] - a[0]) / (b[1] - a[1])


def throughput(url: str, body: dict, concurrency: int, repeats: int) -> float:
    """Median over repeats of output tokens / wall second for `concurrency` parallel requests."""
    def one(_):
        r = requests.post(url + "/v1/completions", json=body, timeout=3600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    runs = []
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(concurrency)))  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            tokens = sum(ex.map(one, range(concurrency)))
            runs.append(tokens / (time.perf_counter() - t))
    return statistics.median(runs)


def build_tiny(root: Path) -> tuple[str, str]:
    from sglang_lenvm import tiny_models as tm

    tm.build_tokenizer(root / "tok")
    tm.build_causal_lm(root / "base", root / "tok", max_pos=8192)
    tm.build_lenvm(root / "lenvm", root / "tok", max_pos=8192)
    return str(root / "base"), str(root / "lenvm")


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
