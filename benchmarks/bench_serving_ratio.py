"""Guided / unguided output throughput as SGLang's own load generator measures it.

    python -m benchmarks.bench_serving_ratio --demo                      # star and one-pass
    python -m benchmarks.bench_serving_ratio --demo --scorings star --concurrency 8 --ks 15
    python -m benchmarks.bench_serving_ratio --tiny --num-prompts 4 --concurrency 2 --ks 2

With --base-url, that server is measured; otherwise one server is started per scoring path
(`--lenvm-scoring star`, `one-pass`). On it, at each concurrency, `python -m sglang.bench_serving --backend sglang-oai --dataset-name random-ids
--random-range-ratio 1 --warmup-requests 0` runs once unguided and once per K with
`--extra-request-body` carrying an at_least target: every request has --input-len random token
ids and produces exactly --output-len tokens (unguided: bench_serving's ignore_eos; guided:
length_mode at_least with length_target = max_tokens, EOS excluded until the end, top_k = K, so
the LenVM scores K candidates at every step). Both sample at temperature 1. The ratio is of
bench_serving's "Output token throughput" from the same server, runs back to back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

from benchmarks import reporting, servers


def candidates_scored(url: str) -> int:
    """The server's count of LenVM-scored candidates so far (/lenvm/stats, all DP ranks)."""
    return sum(int(s["candidates_scored"])
               for s in requests.get(url + "/lenvm/stats", timeout=30).json())


def bench_serving(url: str, tokenizer: str, concurrency: int, extra: dict, args) -> dict:
    """One `sglang.bench_serving` run; its result record (the last JSONL line it writes)."""
    with tempfile.TemporaryDirectory(prefix="lenvm-bench-serving-") as tmp:
        out = Path(tmp) / "result.jsonl"
        cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang-oai",
               "--base-url", url, "--dataset-name", "random-ids", "--tokenizer", tokenizer,
               "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--random-range-ratio", "1",
               "--num-prompts", str(args.num_prompts or 4 * concurrency),
               "--max-concurrency", str(concurrency), "--warmup-requests", "0",
               "--seed", str(args.seed), "--output-file", str(out),
               "--extra-request-body", json.dumps(extra)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"bench_serving failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rec = json.loads(out.read_text().strip().splitlines()[-1])
    keep = ("duration", "completed", "total_input_tokens", "total_output_tokens",
            "output_throughput", "request_throughput", "mean_ttft_ms", "median_ttft_ms",
            "mean_itl_ms", "median_itl_ms", "mean_tpot_ms")
    return {"command": " ".join(cmd[1:]), **{k: rec.get(k) for k in keep}}


def runs(ks: list[int], output_len: int) -> dict:
    """Run name -> the extra request body bench_serving sends."""
    out = {"unguided": {"temperature": 1.0}}
    for k in ks:
        out[f"guided_k{k}"] = {"temperature": 1.0, "top_k": k, "ignore_eos": False,
                               "length_target": output_len, "length_mode": "at_least"}
    return out


def measure(url: str, tokenizer: str, args) -> dict:
    levels: dict = {}
    for c in args.concurrency:
        for name, extra in runs(args.ks, args.output_len).items():
            before = candidates_scored(url)
            rec = bench_serving(url, tokenizer, c, extra, args)
            # proof of what ran: guided runs score K per token, unguided ones nothing
            rec["candidates_scored"] = candidates_scored(url) - before
            expected = (args.num_prompts or 4 * c) * args.output_len
            if rec["completed"] != (args.num_prompts or 4 * c) or \
                    rec["total_output_tokens"] != expected:
                raise RuntimeError(f"{name} at concurrency {c}: {rec['completed']} requests, "
                                   f"{rec['total_output_tokens']} tokens, expected {expected}")
            levels.setdefault(str(c), {})[name] = rec
            print(f"  c={c} {name}: {rec['output_throughput']:.1f} tok/s, "
                  f"{rec['candidates_scored']} candidates scored", flush=True)
        for k in args.ks:
            lv = levels[str(c)]
            lv[f"ratio_k{k}"] = lv[f"guided_k{k}"]["output_throughput"] / \
                lv["unguided"]["output_throughput"]
    return levels


def report(result: dict) -> str:
    ks = result["settings"]["ks"]
    lines = ["| scoring | concurrency | unguided tok/s | "
             + " | ".join(f"guided K = {k} tok/s (ratio)" for k in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    for scoring, levels in result["scorings"].items():
        for c, lv in levels.items():
            cells = [f"{lv[f'guided_k{k}']['output_throughput']:.1f} "
                     f"({lv[f'ratio_k{k}']:.2f})" for k in ks]
            lines.append(f"| {scoring} | {c} | {lv['unguided']['output_throughput']:.1f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = servers.parser(__doc__)
    ap.add_argument("--scorings", nargs="+", default=["star", "one-pass"],
                    choices=["star", "one-pass", "auto"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8])
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 15])
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="requests per run (default: 4 x concurrency)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(reporting.RESULTS / "bench_serving_ratio.json"))
    args = ap.parse_args(argv)
    result = {**reporting.header(args), "scorings": {}, "servers": {}}
    base_args = list(args.server_arg)
    # --base-url: that one server, under the scoring path it reports; else one server per path
    for scoring in [None] if args.base_url else args.scorings:
        if scoring is not None:
            args.server_arg = [*base_args, "--lenvm-scoring", scoring]
        with servers.lenvm_server(args, ap) as srv:
            info = servers.server_info(srv["url"])
            scoring = scoring or requests.get(srv["url"] + "/lenvm/stats",
                                              timeout=30).json()[0]["scoring"]
            print(f"{scoring}: {srv['url']}", flush=True)
            result["servers"][scoring] = info
            result["scorings"][scoring] = measure(srv["url"], srv["base"] or info["model_path"],
                                                  args)
    print(report(result))
    reporting.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
