"""Latency of guided decoding: TTFT, inter-token latency and output tokens/s, guided vs unguided
on the same server, with plain SGLang (no LenVM) as the baseline.

    python -m benchmarks.latency --demo                       # starts both servers itself
    python -m benchmarks.latency --model-path BASE --lenvm-path LENVM
    python -m benchmarks.latency --base-url URL [--plain-base-url URL | --plain-model-path BASE]
    python -m benchmarks.latency --tiny --concurrency 1 2 --tokens 16    # smoke size

Runs, all over the OpenAI API (/v1/completions, streamed):
- unguided:    plain requests on our server (the LenVM is loaded, but these never touch it)
- guided_kK:   the same requests with length guidance and K candidates per step (top_k = K)
- plain_sglang: the unguided requests on `sglang.launch_server` with the same base model
Every request produces exactly --tokens tokens (unguided: ignore_eos; guided: length_mode
at_least with length_target = max_tokens = --tokens, so EOS is excluded until the end), so the
runs differ only in the guidance (unguided requests sample from the full distribution; guided
ones from the top K, which the LenVM scores). Each prompt starts with a unique request number,
so the radix cache cannot serve it (TTFT includes the prefill).

At each concurrency c, c workers each send --rounds requests back to back (a closed loop):
- TTFT: send -> first streamed token; ITL: (last token time - first token time) /
  (tokens after the first chunk) of each request (chunks can carry several tokens; SGLang's
  running usage counts them)
- output tokens/s: all tokens of the level / its wall time
Per-step cost vs generated position: one streamed request at a time, seconds per token in a
window around each position (the LenVM reads its prefix from its own KV cache, so this should
stay flat). Ratios (guided / unguided, unguided / plain) are of numbers from the same run.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from benchmarks import client, metrics, reporting, servers


def request_body(run: str, model: str, prompt: str, tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 1.0}
    if run.startswith("guided_k"):
        body.update(top_k=int(run[len("guided_k"):]), length_target=tokens,
                    length_mode="at_least")
    else:
        body["ignore_eos"] = True
    return body


def with_tokens(body: dict, tokens: int) -> dict:
    """The same request with another length (the guided target moves with max_tokens)."""
    body = {**body, "max_tokens": tokens}
    if "length_target" in body:
        body["length_target"] = tokens
    return body


_counter = itertools.count()


def unique_prompt(prompt: str) -> str:
    # A distinct first token per request: no radix-cache hit, so TTFT includes the prefill.
    return f"Request {next(_counter)}. {prompt}"


def one_request(url: str, body: dict) -> dict:
    s = client.stream_request(url, {**body, "prompt": unique_prompt(body["prompt"])})
    times = s["times"]
    if not times:
        raise RuntimeError("no tokens streamed")
    (t0, n0), (t1, n1) = times[0], times[-1]
    return {"start": s["start"], "end": t1, "tokens": n1, "ttft_s": t0 - s["start"],
            # per-token time after the first chunk; None if everything came in one chunk
            "itl_s": (t1 - t0) / (n1 - n0) if n1 > n0 else None}


def summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    return {"mean": metrics.mean(xs), "p50": metrics.percentile(xs, 50),
            "p90": metrics.percentile(xs, 90), "n": len(xs)}


def measure_level(url: str, body: dict, concurrency: int, rounds: int, warmup_tokens: int,
                  bar: tqdm) -> dict:
    """c workers, each sending `rounds` streamed requests back to back."""
    with ThreadPoolExecutor(concurrency) as ex:
        # Warm-up at this concurrency (allocations, batch shapes), not measured.
        list(ex.map(lambda _: one_request(url, with_tokens(body, warmup_tokens)),
                    range(concurrency)))

        def worker(_):
            out = []
            for _ in range(rounds):
                out.append(one_request(url, body))
                bar.update(1)
            return out

        t = time.perf_counter()
        reqs = [r for rs in ex.map(worker, range(concurrency)) for r in rs]
        wall = time.perf_counter() - t
    tokens = sum(r["tokens"] for r in reqs)
    return {"requests": len(reqs), "tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall,
            "tokens_per_request": summary([r["tokens"] for r in reqs]),
            "ttft_s": summary([r["ttft_s"] for r in reqs]),
            "itl_s": summary([r["itl_s"] for r in reqs])}


def position_curve(url: str, body: dict, positions: list[int], window: int, repeats: int,
                   bar: tqdm) -> dict:
    """Seconds per token around each generated position, one request at a time (median)."""
    far = max(positions) + window + 1
    per_pos = {p: [] for p in positions}
    body = with_tokens(body, far)
    for _ in range(repeats):
        times = client.stream_request(url, {**body, "prompt": unique_prompt(body["prompt"])})
        times = times["times"]
        for p in positions:
            per_pos[p].append(metrics.latency_at(times, p, window))
        bar.update(1)
    return {str(p): statistics.median(v) for p, v in per_pos.items()}


def measure_server(url: str, runs: list[str], args, model: str, result: dict) -> None:
    levels, curves = result["levels"], result["per_position_s"]
    n_req = len(runs) * sum(c * args.rounds for c in args.concurrency)
    with tqdm(total=n_req, desc=f"levels {'/'.join(runs)}", dynamic_ncols=True) as bar:
        # Concurrency outside, runs inside: drift in the machine's load hits every run alike.
        for c in args.concurrency:
            for run in runs:
                body = request_body(run, model, args.prompt, args.tokens)
                levels.setdefault(run, {})[str(c)] = measure_level(
                    url, body, c, args.rounds, args.warmup_tokens, bar)
    if args.max_position:
        with tqdm(total=len(runs) * args.position_repeats, desc="per-position",
                  dynamic_ncols=True) as bar:
            for run in runs:
                body = request_body(run, model, args.prompt, args.tokens)
                curves[run] = position_curve(url, body, positions(args), args.window,
                                             args.position_repeats, bar)


def positions(args) -> list[int]:
    step = args.position_step
    return list(range(max(step, args.window), args.max_position + 1, step))


def ratios(result: dict, ks: list[int]) -> dict:
    """Guided / unguided and unguided / plain, per concurrency: tok/s, mean ITL, mean TTFT."""
    lv = result["levels"]
    pairs = [(f"guided_k{k}", "unguided") for k in ks] + [("unguided", "plain_sglang")]
    out = {}
    for c in map(str, result["settings"]["concurrency"]):
        for a, b in pairs:
            if c in lv.get(a, {}) and c in lv.get(b, {}):
                x, y = lv[a][c], lv[b][c]
                out.setdefault(c, {})[f"{a}_vs_{b}"] = {
                    "output_tok_s": x["output_tok_s"] / y["output_tok_s"],
                    "itl_mean": _div(x["itl_s"]["mean"], y["itl_s"]["mean"]),
                    "ttft_mean": _div(x["ttft_s"]["mean"], y["ttft_s"]["mean"])}
    return out


def _div(a, b):
    return a / b if a is not None and b else None


def plot(result: dict, path) -> None:
    plt = reporting.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    lv = result["levels"]
    for run, by_c in lv.items():
        cs = sorted(by_c, key=int)
        x = [int(c) for c in cs]
        axes[0, 0].plot(x, [by_c[c]["output_tok_s"] for c in cs], "o-", label=run)
        axes[0, 1].plot(x, [ms(by_c[c]["itl_s"]["mean"]) for c in cs], "o-", label=run)
        axes[1, 0].plot(x, [ms(by_c[c]["ttft_s"]["mean"]) for c in cs], "o-", label=run)
    for ax, title in zip((axes[0, 0], axes[0, 1], axes[1, 0]),
                         ("output tokens/s", "inter-token latency (ms, mean)",
                          "time to first token (ms, mean)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[1, 1]
    for run, curve in result["per_position_s"].items():
        ax.plot([int(p) for p in curve], [v * 1e3 for v in curve.values()], "o-", label=run)
    ax.set_xlabel("generated position (tokens)")
    ax.set_title("ms/token vs position (concurrency 1)")
    ax.legend(fontsize=8)
    fig.suptitle(reporting.machine_line(result["machine"]), fontsize=8)
    reporting.save_figure(fig, path)


def ms(seconds):
    return None if seconds is None else seconds * 1e3


def report(r: dict) -> str:
    rows = []
    for run, by_c in r["levels"].items():
        for c, v in sorted(by_c.items(), key=lambda kv: int(kv[0])):
            rows.append([run, int(c), v["output_tok_s"], ms(v["itl_s"]["mean"]),
                         ms(v["itl_s"]["p90"]), ms(v["ttft_s"]["mean"]), ms(v["ttft_s"]["p90"])])
    out = [reporting.machine_line(r["machine"]), "",
           reporting.md_table(["run", "concurrency", "tok/s", "ITL ms", "ITL p90 ms", "TTFT ms",
                               "TTFT p90 ms"], rows), ""]
    rrows = [[name, int(c), v["output_tok_s"], v["itl_mean"], v["ttft_mean"]]
             for c, by in r["ratios"].items() for name, v in by.items()]
    out += [reporting.md_table(["ratio", "concurrency", "tok/s", "ITL", "TTFT"], rrows)]
    if r["per_position_s"]:
        pos = list(next(iter(r["per_position_s"].values())))
        out += ["", reporting.md_table(["run"] + [f"ms/tok @{p}" for p in pos],
                                       [[run] + [curve[p] * 1e3 for p in pos]
                                        for run, curve in r["per_position_s"].items()])]
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = servers.parser(__doc__)
    ap.add_argument("--plain-base-url", help="a running plain SGLang server on the same base "
                    "model (with --base-url)")
    ap.add_argument("--plain-model-path", help="start plain SGLang on this base model (with "
                    "--base-url; by default the base model of the server this script started)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain SGLang baseline")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 15], help="candidates per step")
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per request")
    ap.add_argument("--rounds", type=int, default=2,
                    help="requests each of the c workers sends per level")
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--max-position", type=int, default=1024,
                    help="per-position curve up to this position (0: skip)")
    ap.add_argument("--position-step", type=int, default=128)
    ap.add_argument("--window", type=int, default=32, help="tokens either side of a position")
    ap.add_argument("--position-repeats", type=int, default=1)
    ap.add_argument("--prompt", default="Write a long story about a lighthouse keeper and the "
                                        "ships that pass by the rocky coast at night.")
    ap.add_argument("--out", default=str(reporting.RESULTS / "latency.json"))
    args = ap.parse_args(argv)

    result = {**reporting.header(args), "server": None, "plain_server": None, "levels": {},
              "per_position_s": {}, "ratios": {}, "notes": []}
    runs = ["unguided"] + [f"guided_k{k}" for k in args.ks]
    with servers.lenvm_server(args, ap) as srv:
        result["server"] = servers.server_info(srv["url"])
        measure_server(srv["url"], runs, args, servers.model_name(srv["url"]), result)
        # How much LenVM work the guided runs did (star tokens, candidates computed), read
        # right after them: the counters cover everything this server served.
        result["lenvm_stats_after_run"] = servers.lenvm_work(srv["url"])
        base = srv["base"]
    # A plain server started here runs after ours has stopped (if we started ours), so the two
    # do not share the machine.
    if args.no_plain:
        result["notes"].append("plain SGLang baseline skipped (--no-plain)")
    elif args.plain_base_url or args.plain_model_path or base:
        plain = (contextlib.nullcontext(args.plain_base_url.rstrip("/")) if args.plain_base_url
                 else servers.plain_server(args.plain_model_path or base, args))
        with plain as url:
            result["plain_server"] = servers.server_info(url)
            measure_server(url, ["plain_sglang"], args, servers.model_name(url), result)
    else:
        result["notes"].append("plain SGLang baseline not measured: --base-url without "
                               "--plain-base-url or --plain-model-path")
    result["ratios"] = ratios(result, args.ks)
    return reporting.finish(result, args.out, plot, report)


if __name__ == "__main__":
    main()
