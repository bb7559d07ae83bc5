"""Measure a served LenVM on held-out prompts: prompt-boundary MRE and `equal` guidance.

    python -m sglang_lenvm.training.eval_demo --url http://127.0.0.1:31501 \
        --heldout heldout_samples.jsonl --out results.json

MRE (paper eq. 13-15): per held-out prompt, the server's predicted length at the prompt
boundary (POST /v1/length/predict) against L_GT from that prompt's unguided samples.
Samples cut by max_tokens have an unknown length >= max_tokens; both ways of handling them are
reported (dropped, or counted as max_tokens, a lower bound).

Equal mode: for a few targets, guided requests (length_mode="equal") on held-out prompts,
with the output lengths against the target and against the same prompts' unguided lengths.
This is a quick check, not the full evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from sglang_lenvm.training.targets import ground_truth_length, prompt_boundary_mre


def load_samples(path: str) -> dict[str, dict]:
    by_prompt: dict[str, dict] = {}
    for line in open(path):
        r = json.loads(line)
        d = by_prompt.setdefault(r["prompt_id"], {"messages": r["messages"],
                                                  "category": (r.get("meta") or {}).get("category"),
                                                  "lengths": [], "truncated": []})
        d["lengths"].append(r["completion_tokens"])
        d["truncated"].append(bool(r["truncated"]))
    return by_prompt


def mre_report(url: str, samples: dict[str, dict]) -> dict:
    preds, gamma = {}, None
    for pid, d in samples.items():
        r = requests.post(url + "/v1/length/predict", json={"messages": d["messages"]}, timeout=300)
        r.raise_for_status()
        preds[pid] = r.json()["predicted_length"]
        gamma = r.json()["gamma"]
    out = {"gamma": gamma, "prompts": len(samples)}
    for name, keep_cut in (("dropped", False), ("as_max_tokens", True)):
        ids = [p for p in samples if keep_cut or not all(samples[p]["truncated"])]
        lengths = [[L for L, cut in zip(samples[p]["lengths"], samples[p]["truncated"])
                    if keep_cut or not cut] for p in ids]
        out[f"mre_truncated_{name}"] = prompt_boundary_mre([preds[p] for p in ids], lengths, gamma)
        # What a length-blind predictor gets: one length (the pooled L_GT) for every prompt.
        pooled = ground_truth_length([L for ls in lengths for L in ls], gamma)
        out[f"constant_baseline_mre_truncated_{name}"] = prompt_boundary_mre(
            [pooled] * len(ids), lengths, gamma)
    cats: dict[str, list] = {}
    for pid, d in samples.items():
        cats.setdefault(d["category"], []).append(pid)
    out["mre_by_category_truncated_as_max_tokens"] = {
        c: prompt_boundary_mre([preds[p] for p in ids], [samples[p]["lengths"] for p in ids],
                               gamma) for c, ids in sorted(cats.items(), key=lambda x: str(x[0]))}
    out["predictions"] = {p: {"predicted": preds[p], "lengths": samples[p]["lengths"],
                              "L_GT": ground_truth_length(samples[p]["lengths"], gamma)}
                          for p in samples}
    return out


def equal_report(url: str, samples: dict[str, dict], targets: list[int], n_prompts: int,
                 concurrency: int, max_tokens_cap: int) -> dict:
    ids = sorted(samples)[:: max(1, len(samples) // n_prompts)][:n_prompts]
    jobs = [(t, p) for t in targets for p in ids]

    def run(job):
        t, p = job
        body = {"model": "m", "messages": samples[p]["messages"], "temperature": 1.0,
                "top_p": 1.0, "max_tokens": min(max_tokens_cap, 2 * t + 64),
                "length_target": t, "length_mode": "equal"}
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=3600)
        r.raise_for_status()
        data = r.json()
        return t, p, data["usage"]["completion_tokens"], data["choices"][0]["finish_reason"]

    t0 = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(run, jobs))
    out = {"prompts": ids, "seconds": round(time.time() - t0, 1), "targets": {}}
    unguided = {p: statistics.mean(samples[p]["lengths"]) for p in ids}
    for t in targets:
        got = [(p, L, f) for tt, p, L, f in results if tt == t]
        lengths = [L for _, L, _ in got]
        out["targets"][t] = {
            "lengths": lengths,
            "mean_length": statistics.mean(lengths),
            "median_length": statistics.median(lengths),
            "mean_abs_rel_dev": statistics.mean(abs(L - t) / t for L in lengths),
            "unguided_mean_length": statistics.mean(unguided[p] for p, _, _ in got),
            "unguided_mean_abs_rel_dev": statistics.mean(
                abs(L - t) / t for p, _, _ in got for L in samples[p]["lengths"]),
            "finish_reasons": [f for _, _, f in got],
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sglang_lenvm.training.eval_demo")
    ap.add_argument("--url", required=True, help="our server, started with the LenVM")
    ap.add_argument("--heldout", required=True, help="generate_data JSONL of held-out prompts")
    ap.add_argument("--out", required=True)
    ap.add_argument("--equal-targets", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--equal-prompts", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens-cap", type=int, default=512)
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    samples = load_samples(args.heldout)
    report = {"mre": mre_report(url, samples)}
    print(json.dumps({k: v for k, v in report["mre"].items() if k != "predictions"}, indent=2),
          file=sys.stderr)
    if args.equal_targets:
        report["equal"] = equal_report(url, samples, args.equal_targets, args.equal_prompts,
                                       args.concurrency, args.max_tokens_cap)
        print(json.dumps({t: {k: v for k, v in d.items() if k != "lengths"}
                          for t, d in report["equal"]["targets"].items()}, indent=2),
              file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
