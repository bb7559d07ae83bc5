"""Length following, LIFEBench-style: equal / at_most / at_least at token targets, prompt-only
baseline vs the same prompt with LenVM guidance, on the same server.

    python -m benchmarks.length_following --demo                  # our prompt set, 16..256
    python -m benchmarks.length_following --base-url URL --lifebench data_lite_no_summary.jsonl
    python -m benchmarks.length_following --tiny --limit 2 --targets 8 16     # smoke size

Prompts. Rows in LIFEBench's JSONL format (id, category, type, lang, task, raw_data), whose
`task` holds `{word_count_type}` and `{word_count}` placeholders. They are filled the way
LIFEBench's exp_request.py fills them (str.replace of both placeholders; Chinese rows get the
Chinese wording). Then, as the LenVM authors' token-level variant of LIFEBench does, the length
unit becomes tokens: "{word_count} words" -> "N tokens", "{word_count}字" -> "N 个token",
"字数" -> "token数".
- `--lifebench PATH`: LIFEBench's own rows, with LIFEBench's wording ("equal to" / "at most" /
  "at least"; 等于 / 至多有 / 至少有), e.g. "The article must be equal to 64 tokens long."
- default: benchmarks/data/length_prompts.jsonl, our 24 prompts (QA, reasoning, creative
  writing; 12 English, 12 Chinese), whose requirement reads "Your answer must be exactly /
  at most / at least N tokens." (恰好 / 至多 / 至少 N 个token).

Runs. `baseline`: the filled prompt alone. `lenvm`: the same prompt plus `length_target` = N
and `length_mode`. Both: chat completions, temperature 1.0, top_p 0.999, top_k 15 (the paper's
setting), max_tokens = --max-tokens-factor x N (outputs that hit it count at that length; the
score at 4x the target is 0.03 for equal, so the cap barely helps the baseline).

Metrics, exactly LIFEBench's (evaluate/evaluate_all_results.py), with L = completion tokens
(EOS included) and LD = (L - N) / N:
  equal:    LS = 100 e^{5 LD} if LD < 0, else 100 e^{-2 LD}
  at_most:  LS = 100 if LD <= 0, else 100 e^{-2 LD}
  at_least: LS = 100 if LD >= 0, else 100 e^{5 LD}
Per (mode, target): mean LS over prompts, and the deviation mean |LD| (LIFEBench reports it in
%). Per mode: the mean of the per-target values (LIFEBench rounds each per-target LS to 0.1
first; we keep full precision, a difference of at most 0.05). Like LIFEBench's illegal_filter,
outputs with L <= 1 are dropped (counted in `dropped`).

Text quality beside every length score (benchmarks/quality.py): the base model's mean NLL per
generated token (scored by the same server over prompt + output), the share of outputs with a
3-word phrase repeated 3+ times, the share of outputs ended abruptly (a stop token the base
model gave < 1%), and the share of tokens outside the base model's top 3; per
(run, mode) over all kept outputs, and the NLL gap of each run to the prompt-only baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from benchmarks import client, metrics, parallel, prompts, quality, reporting, servers

MODES = ("equal", "at_most", "at_least")
RUNS = ("baseline", "lenvm")
LIFEBENCH_WORDING = {"en": {"equal": "equal to", "at_most": "at most", "at_least": "at least"},
                     "cn": {"equal": "等于", "at_most": "至多有", "at_least": "至少有"}}
OUR_WORDING = {"en": {"equal": "exactly", "at_most": "at most", "at_least": "at least"},
               "cn": {"equal": "恰好", "at_most": "至多", "at_least": "至少"}}
# LIFEBench counts words (English) or characters (Chinese); the token-level variant asks for
# tokens instead (the LenVM authors' _convert_length_wording does the same).
TOKEN_UNITS = (("{word_count} words", "{word_count} tokens"),
               ("{word_count}字", "{word_count} 个token"), ("字数", "token数"))


def length_deviation(length: int, target: int) -> float:
    return (length - target) / target


def length_score(mode: str, ld: float) -> float:
    if mode == "equal":
        return 100 * math.exp(5 * ld) if ld < 0 else 100 * math.exp(-2 * ld)
    if mode == "at_most":
        return 100.0 if ld <= 0 else 100 * math.exp(-2 * ld)
    if mode == "at_least":
        return 100.0 if ld >= 0 else 100 * math.exp(5 * ld)
    raise ValueError(mode)


def fill_task(task: str, lang: str, mode: str, target: int, wording: dict) -> str:
    if "{word_count}" not in task:
        raise ValueError(f"task has no {{word_count}} placeholder: {task[:80]!r}")
    for old, new in TOKEN_UNITS:
        task = task.replace(old, new)
    lang = "cn" if lang == "cn" else "en"
    return (task.replace("{word_count_type}", wording[lang][mode])
            .replace("{word_count}", str(target)))


def make_requests(rows: list[dict], wording: dict, args, model: str) -> list[dict]:
    reqs = []
    for row in rows:
        for mode in args.modes:
            for target in args.targets:
                prompt = fill_task(row["task"], row["lang"], mode, target, wording)
                messages = ([{"role": "system", "content": args.system}] if args.system else [])
                messages.append({"role": "user", "content": prompt})
                body = {"model": model, "messages": messages, "temperature": args.temperature,
                        "top_p": args.top_p, "top_k": args.top_k,
                        "max_tokens": max(int(args.max_tokens_factor * target), target + 1),
                        "return_prompt_token_ids": True, "return_token_ids": True}
                body.update(args.extra_body)
                for run in args.runs:
                    b = dict(body)
                    if run == "lenvm":
                        b.update(length_target=target, length_mode=mode)
                    for sample in range(getattr(args, "samples", 1)):
                        reqs.append({"id": row.get("id"), "lang": row["lang"],
                                     "category": row.get("category"), "mode": mode,
                                     "target": target, "run": run, "sample": sample,
                                     "body": b})
    return reqs


def run_one(url: str, req: dict) -> dict:
    r = client.chat(url, req["body"])
    choice = r["choices"][0]
    length = r["usage"]["completion_tokens"]
    ld = length_deviation(length, req["target"])
    lc = choice.get("length_control") or {}
    text = choice["message"]["content"] or ""
    return {k: req[k] for k in ("id", "lang", "category", "mode", "target", "run", "sample")} | {
        "length": length, "finish_reason": choice["finish_reason"], "ld": ld,
        "ls": length_score(req["mode"], ld), "predicted_length": lc.get("predicted_length"),
        "text": text, **quality.measure(url, choice["prompt_token_ids"],
                                        choice["response_token_ids"], text,
                                        choice["finish_reason"])}


def cell(records: list[dict]) -> dict:
    kept = [r for r in records if r["length"] > 1]  # LIFEBench's illegal_filter
    lengths = [r["length"] for r in kept]
    return {"n": len(kept), "dropped": len(records) - len(kept),
            "truncated": sum(r["finish_reason"] == "length" for r in kept),
            "mean_length": metrics.mean(lengths),
            "median_length": metrics.percentile(lengths, 50),
            "mean_ld": metrics.mean(r["ld"] for r in kept),
            "deviation": metrics.mean(abs(r["ld"]) for r in kept),
            "ls": metrics.mean(r["ls"] for r in kept), **quality.summarize(kept)}


def summarize(records: list[dict], args) -> dict:
    """cells[run][mode][target], averages[run][mode] (also per language), improvement."""
    cells, averages, by_lang = {}, {}, {}
    for run in args.runs:
        for mode in args.modes:
            sel = [r for r in records if r["run"] == run and r["mode"] == mode]
            per_t = {str(t): cell([r for r in sel if r["target"] == t]) for t in args.targets}
            cells.setdefault(run, {})[mode] = per_t
            averages.setdefault(run, {})[mode] = {
                **average(per_t.values()), **quality.summarize(r for r in sel if r["length"] > 1)}
            for lang in sorted({r["lang"] for r in sel}):
                per_tl = [cell([r for r in sel if r["target"] == t and r["lang"] == lang])
                          for t in args.targets]
                by_lang.setdefault(run, {}).setdefault(mode, {})[lang] = average(per_tl)
    improvement, nll_gap, head_gap = {}, {}, {}
    if set(RUNS) <= set(args.runs):
        for mode in args.modes:
            a, b = averages["lenvm"][mode], averages["baseline"][mode]
            improvement[mode] = quality.gap(a["ls"], b["ls"])
            nll_gap[mode] = quality.gap(a["nll"], b["nll"])
            head_gap[mode] = quality.gap(a["nll_head"], b["nll_head"])
    return {"cells": cells, "averages": averages, "averages_by_lang": by_lang,
            "ls_improvement": improvement, "nll_gap": nll_gap, "nll_head_gap": head_gap,
            "samples": spread(records, args)}


def spread(records: list[dict], args) -> dict:
    """With --samples S > 1: every number of `averages` (and the NLL gap, paired by sample)
    once per sample, and their mean and standard deviation over the S samples: how much of a
    difference between two runs is sampling noise. {} with one sample."""
    n = getattr(args, "samples", 1)
    if n <= 1:
        return {}
    one = argparse.Namespace(**{**vars(args), "samples": 1})
    per = [summarize([r for r in records if r.get("sample", 0) == s], one) for s in range(n)]
    keys = ("ls", "nll", "nll_head", "repetition", "degenerate", "abrupt", "off_top3")
    out = {}
    for run in args.runs:
        for mode in args.modes:
            rows = [p["averages"][run][mode] for p in per]
            out.setdefault(run, {})[mode] = {k: _mean_sd([r[k] for r in rows]) for k in keys}
    for key in ("ls_improvement", "nll_gap", "nll_head_gap"):
        for mode in args.modes:
            vals = [p[key].get(mode) for p in per]
            out.setdefault(key, {})[mode] = _mean_sd(vals)
    return out


def _mean_sd(vals) -> dict:
    vals = [v for v in vals if v is not None]
    return {"mean": metrics.mean(vals),
            "sd": statistics.stdev(vals) if len(vals) > 1 else None, "values": vals}


def average(cells) -> dict:
    """LIFEBench's AVG: the mean over targets of the per-target means (empty targets skipped)."""
    cells = [c for c in cells if c["n"]]
    return {"ls": metrics.mean(c["ls"] for c in cells),
            "deviation": metrics.mean(c["deviation"] for c in cells),
            "targets": len(cells)}


def plot(result: dict, path_scores, path_lengths) -> None:
    plt = reporting.pyplot()
    s, settings = result["summary"], result["settings"]
    modes = settings["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for run in settings["runs"]:
            per_t = s["cells"][run][mode]
            ts = [t for t in per_t if per_t[t]["ls"] is not None]
            ax.plot([int(t) for t in ts], [per_t[t]["ls"] for t in ts], "o-", label=run)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("target (tokens)")
        ax.set_ylabel("length score")
        ax.set_title(mode)
        ax.legend()
    fig.suptitle(f"{result['prompt_set']} — {reporting.machine_line(result['machine'])}",
                 fontsize=8)
    reporting.save_figure(fig, path_scores)

    # Output length vs target (median and interquartile range), one panel per mode.
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.8), squeeze=False)
    recs = result["records"]
    for ax, mode in zip(axes[0], modes):
        for i, run in enumerate(settings["runs"]):
            xs, med, lo, hi = [], [], [], []
            for t in settings["targets"]:
                ls = [r["length"] for r in recs if r and r["run"] == run and r["mode"] == mode
                      and r["target"] == t]
                if ls:
                    xs.append(t * (1.04 if i else 0.96))  # side by side
                    m = metrics.percentile(ls, 50)
                    med.append(m)
                    lo.append(m - metrics.percentile(ls, 25))
                    hi.append(metrics.percentile(ls, 75) - m)
            ax.errorbar(xs, med, yerr=[lo, hi], fmt="o", capsize=3, label=run)
        ts = settings["targets"]
        ax.plot(ts, ts, "k--", lw=0.8, label="target")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("target (tokens)")
        ax.set_ylabel("completion tokens (median, IQR)")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    reporting.save_figure(fig, path_lengths)


def report(result: dict) -> str:
    s, st = result["summary"], result["settings"]
    out = [reporting.machine_line(result["machine"]), f"prompts: {result['prompt_set']}", ""]
    rows = []
    for run in st["runs"]:
        for mode in st["modes"]:
            per_t = s["cells"][run][mode]
            avg = s["averages"][run][mode]
            rows.append([run, mode] + [per_t[str(t)]["ls"] for t in st["targets"]] +
                        [avg["ls"], pct(avg["deviation"]) if mode == "equal" else None,
                         avg["nll"], avg["nll_head"], pct(avg["repetition"]),
                         pct(avg.get("degenerate")), pct(avg.get("abrupt")),
                         pct(avg["off_top3"]),
                         sum(c["dropped"] for c in per_t.values()),
                         sum(c["truncated"] for c in per_t.values())])
    out.append(reporting.md_table(["run", "mode"] + [f"LS@{t}" for t in st["targets"]] +
                                  ["LS avg", "deviation (equal)", "NLL/token",
                                   "NLL, first N tokens", "repetitive", "degenerate",
                                   "abrupt end", "off top-3",
                                   "dropped (L<=1)", "cut"], rows))
    if s["ls_improvement"]:
        out += ["", "LS improvement (lenvm - baseline): " + ", ".join(
            f"{m} {v:+.1f}" if v is not None else f"{m} –"
            for m, v in s["ls_improvement"].items())]
        for key, what in (("nll_gap", "NLL gap"), ("nll_head_gap", "NLL gap, first N tokens")):
            out += [f"{what} (lenvm - baseline, nats/token): " + ", ".join(
                f"{m} {v:+.2f}" if v is not None else f"{m} –" for m, v in s[key].items())]
    if s.get("samples"):
        out += ["", f"Over {st['samples']} samples of every request (mean ± sd of the "
                    "per-sample averages):"]
        for run in st["runs"]:
            for mode in st["modes"]:
                sp = s["samples"][run][mode]
                out.append(f"- {run} {mode}: LS {_pm(sp['ls'], '.1f')}, NLL/token "
                           f"{_pm(sp['nll'], '.2f')}, repetitive {_pm(sp['repetition'], '.2f')}")
        for mode in st["modes"]:
            if s["samples"]["nll_gap"][mode]["mean"] is not None:
                out.append(f"- NLL gap {mode} (paired by sample): "
                           f"{_pm(s['samples']['nll_gap'][mode], '+.2f')}")
    if result["errors"]:
        out += ["", f"{len(result['errors'])} request(s) failed, see `errors` in the JSON"]
    return "\n".join(out)


def _pm(ms: dict, fmt: str) -> str:
    if ms["mean"] is None:
        return "–"
    return format(ms["mean"], fmt) + ("" if ms["sd"] is None else " ± " + format(ms["sd"], ".2f"))


def pct(x):
    return None if x is None else f"{100 * x:.0f}%"


def main(argv=None) -> dict:
    ap = servers.parser(__doc__)
    ap.add_argument("--lifebench", help="LIFEBench JSONL (id, category, type, lang, task, "
                                        "raw_data) instead of our prompt set")
    ap.add_argument("--prompts", default=str(prompts.DATA / "length_prompts.jsonl"),
                    help="our prompt set (LIFEBench format, used without --lifebench)")
    ap.add_argument("--limit", type=int, help="use N prompts spread evenly over the file "
                    "(our set is ordered by language and category, so every group stays)")
    ap.add_argument("--targets", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.999)
    ap.add_argument("--top-k", type=int, default=15)
    ap.add_argument("--max-tokens-factor", type=float, default=4.0,
                    help="max_tokens = factor x target")
    ap.add_argument("--system", help="a system message before each prompt")
    ap.add_argument("--extra-body", type=json.loads, default={},
                    help="JSON object merged into every request body (e.g. a decision knob)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--samples", type=int, default=1,
                    help="send every request S times (records keep `sample`); the summary then "
                         "also gives each average per sample, with mean and sd over the S")
    ap.add_argument("--out", default=str(reporting.RESULTS / "length_following.json"))
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be >= 1")

    path = args.lifebench or args.prompts
    rows = prompts.spread(prompts.load_jsonl(path), args.limit)
    wording = LIFEBENCH_WORDING if args.lifebench else OUR_WORDING
    result = {**reporting.header(args), "prompt_set": path, "n_prompts": len(rows)}
    with servers.lenvm_server(args, ap) as srv:
        url = srv["url"]
        result["server"] = servers.server_info(url)
        reqs = make_requests(rows, wording, args, servers.model_name(url))
        errors = []
        records = parallel.parallel_map(lambda q: run_one(url, q), reqs, args.concurrency,
                                        "length following", errors)
    result["errors"] = [{**e, "request": {k: v for k, v in reqs[e["index"]].items()
                                          if k != "body"}} for e in errors]
    records = [r for r in records if r is not None]
    result["summary"] = summarize(records, args)
    result["records"] = records
    return reporting.finish(result, args.out, plot, report, plots=(".png", "_lengths.png"))


if __name__ == "__main__":
    main()
