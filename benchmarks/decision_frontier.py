"""Length score against text quality for each decision rule: the frontier a default is picked on.

    python -m benchmarks.decision_frontier --demo --rules 0:inf 0.1:inf 0.1:4 --modes equal
    python -m benchmarks.decision_frontier --tiny --limit 2 --targets 8 --rules 0:inf 0.2:2
    python -m benchmarks.decision_frontier --base-url URL   # one point: the server's own rule

A rule is `ALPHA:LAMBDA[:MU[:NU]]`: the server's --lenvm-plausibility ALPHA,
--lenvm-equal-softness LAMBDA (`inf`: the deterministic closest candidate),
--lenvm-at-least-end-pull MU (default 0) and --lenvm-at-most-softness NU (default inf: the hard
rule). For each rule a server is started with it
(one at a time: a 2-core machine cannot time two) and `benchmarks.length_following` runs its
`lenvm` requests; the prompt-only `baseline` runs once, on the first server (it does not
involve the LenVM). Everything else (prompts, targets, sampling, metrics) is exactly
length_following's: LIFEBench's length score, and beside it the base model's NLL per generated
token, the share of repetitive, degenerate and abruptly ended outputs and the share of tokens
outside the base model's top 3 (benchmarks/quality.py). The plot shows, per mode, length score against NLL for every rule,
the baseline, and the bar of issue 14's goal (baseline NLL + 0.2).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks import length_following, parallel, prompts, quality, reporting, servers


def parse_rule(text: str) -> tuple[float, float, float, float]:
    try:
        parts = [float(x) for x in text.split(":")]
        if len(parts) not in (2, 3, 4):
            raise ValueError
        defaults = [0.0, math.inf]  # MU, NU
        return tuple(parts + defaults[len(parts) - 2:])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a rule is ALPHA:LAMBDA[:MU[:NU]], got {text!r}") from None


def _g(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def rule_name(alpha: float, lam: float, mu: float = 0.0, nu: float = math.inf) -> str:
    name = f"a={alpha:g} l={_g(lam)}"
    return name + (f" mu={mu:g}" if mu else "") + ("" if math.isinf(nu) else f" nu={nu:g}")


def _inf(x) -> float:
    """JSON's null for an infinite knob, back to inf."""
    return math.inf if x is None else x


def _finite(x: float):
    return x if math.isfinite(x) else None


def name_of(rule: dict) -> str:
    name = rule_name(rule["alpha"], _inf(rule["lambda"]), rule.get("mu", 0.0),
                     _inf(rule.get("nu")))
    name += " guard={}x{}".format(*rule["repeat"]) if rule.get("repeat") else ""
    name += " ends" if rule.get("sentence_end") == "on" else ""
    name += f" w={rule['end_weight']:g}" if rule.get("end_weight") else ""
    name += f" boost={rule['end_boost']:g}" if rule.get("end_boost", 1) != 1 else ""
    name += f" under={rule['undershoot']:g}" if rule.get("undershoot", 1) != 1 else ""
    return name + (" [{}]".format(rule["label"].split(",")[0]) if rule.get("label") else "")


def run_rule(args, ap, rows, wording, rule, with_baseline: bool) -> dict:
    """One rule's requests (and the baseline's); rule None: a running server's own rule."""
    sub = argparse.Namespace(**vars(args))
    if rule is not None:
        sub.server_arg = [*args.server_arg, "--lenvm-plausibility", str(rule[0]),
                          "--lenvm-equal-softness", str(rule[1]),
                          "--lenvm-at-least-end-pull", str(rule[2]),
                          "--lenvm-at-most-softness", str(rule[3])]
    sub.runs = ["baseline", "lenvm"] if with_baseline else ["lenvm"]
    with servers.lenvm_server(sub, ap) as srv:
        url = srv["url"]
        server = servers.server_info(url)
        lenvm = server.get("lenvm") or {}
        alpha = lenvm.get("plausibility", 0.0)
        lam = _inf(lenvm.get("equal_softness"))
        mu = lenvm.get("at_least_end_pull", 0.0)
        nu = _inf(lenvm.get("at_most_softness"))  # the server's own value, read back
        # the repetition guard (--lenvm-repeat-ngram N, --lenvm-repeat-limit C; via
        # --server-arg): [N, C], or None when it is off
        repeat = ([lenvm["repeat_ngram"], lenvm["repeat_limit"]]
                  if lenvm.get("repeat_ngram") else None)
        reqs = length_following.make_requests(rows, wording, sub, servers.model_name(url))
        errors = []
        # sentence ends in the decision (--lenvm-sentence-end; servers before it: None)
        ends = lenvm.get("sentence_end")
        knobs = {"alpha": alpha, "lambda": _finite(lam), "mu": mu, "nu": _finite(nu),
                 "repeat": repeat, "sentence_end": ends,
                 # at_most's stop-token boost after a sentence end, equal's undershoot weight
                 "end_boost": lenvm.get("at_most_end_boost") or 1.0,
                 "undershoot": lenvm.get("equal_undershoot") or 1.0}
        records = parallel.parallel_map(lambda q: length_following.run_one(url, q), reqs,
                                        args.concurrency, name_of(knobs), errors)
    records = [r for r in records if r is not None]
    return {**knobs, "server": server, "summary": length_following.summarize(records, sub),
            "records": records, "errors": errors}


def plot(result: dict, path) -> None:
    plt = reporting.pyplot()
    modes = result["settings"]["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.8 * len(modes), 4), squeeze=False)
    base = result["baseline"]
    for ax, mode in zip(axes[0], modes):
        for rule in result["rules"]:
            avg = rule["summary"]["averages"]["lenvm"][mode]
            if avg["ls"] is None or avg["nll"] is None:
                continue
            ax.plot(avg["nll"], avg["ls"], "o")
            ax.annotate(name_of(rule),
                        (avg["nll"], avg["ls"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        b = base.get(mode) or {}
        if b.get("nll") is not None:
            ax.plot(b["nll"], b["ls"], "ks", label="prompt only")
            ax.axvline(b["nll"] + 0.2, color="grey", ls="--", lw=0.8, label="baseline + 0.2")
        ax.set_xlabel("base-model NLL per token (nats)")
        ax.set_ylabel("length score")
        ax.set_title(mode)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['prompt_set']} — {reporting.machine_line(result['machine'])}",
                 fontsize=8)
    reporting.save_figure(fig, path)


def report(result: dict) -> str:
    st = result["settings"]
    out = [reporting.machine_line(result["machine"]), f"prompts: {result['prompt_set']}", ""]
    rows = []
    for mode in st["modes"]:
        b = result["baseline"].get(mode) or {}
        rows.append(["prompt only", mode, b.get("ls"), b.get("nll"), None, b.get("nll_head"),
                     None, length_following.pct(b.get("repetition")),
                     length_following.pct(b.get("degenerate")),
                     length_following.pct(b.get("abrupt")),
                     length_following.pct(b.get("off_top3"))])
        for rule in result["rules"]:
            a = rule["summary"]["averages"]["lenvm"][mode]
            rows.append([name_of(rule), mode, a["ls"],
                         a["nll"], quality.gap(a["nll"], b.get("nll")), a.get("nll_head"),
                         quality.gap(a.get("nll_head"), b.get("nll_head")),
                         length_following.pct(a["repetition"]),
                         length_following.pct(a.get("degenerate")),
                         length_following.pct(a.get("abrupt")),
                         length_following.pct(a["off_top3"])])
    out.append(reporting.md_table(["rule", "mode", "LS avg", "NLL/token", "NLL gap",
                                   "NLL first N", "gap first N", "repetitive", "degenerate",
                                   "abrupt end", "off top-3"], rows))
    return "\n".join(out)


SAME = ("limit", "targets", "modes", "temperature", "top_p", "top_k", "max_tokens_factor",
        "system", "extra_body")


def with_baseline_summary(result: dict, records: list[dict], args) -> dict:
    """A rule's summary against the sweep's one baseline (the first rule's, or the --out file's
    with --append), so every row has its NLL gap and, with --samples, its spread."""
    both = argparse.Namespace(**{**vars(args), "runs": ["baseline", "lenvm"]})
    return length_following.summarize(result["baseline_records"] + records, both)


def _earlier(args, fresh: dict) -> dict:
    """The earlier sweep in --out, checked to be comparable: its baseline stands for this one."""
    earlier = json.loads(Path(args.out).read_text())
    old, new = earlier["settings"], fresh["settings"]
    diff = [k for k in SAME if old.get(k) != new.get(k)]
    if Path(earlier["prompt_set"]).name != Path(fresh["prompt_set"]).name:
        diff.append("prompt set")  # (by file name: a copy of the tree may have run it)
    if diff or earlier["n_prompts"] != fresh["n_prompts"]:
        raise SystemExit(f"--append: {args.out} was run with other settings ({diff})")
    earlier.setdefault("appended", []).append({"started": fresh["started"],
                                               "machine": fresh["machine"]})
    return earlier


def main(argv=None) -> dict:
    ap = servers.parser(__doc__)
    ap.add_argument("--rules", type=parse_rule, nargs="+",
                    help="ALPHA:LAMBDA[:MU[:NU]] rules (plausibility floor : equal softness : "
                         "at_least end pull : at_most softness); one server each (not with --base-url, which "
                         "measures the server's own rule)")
    ap.add_argument("--lifebench", help="LIFEBench JSONL instead of our prompt set")
    ap.add_argument("--prompts", default=str(prompts.DATA / "length_prompts.jsonl"))
    ap.add_argument("--limit", type=int, help="N prompts spread evenly over the file")
    ap.add_argument("--targets", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--modes", nargs="+", choices=length_following.MODES,
                    default=list(length_following.MODES))
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.999)
    ap.add_argument("--top-k", type=int, default=15)
    ap.add_argument("--max-tokens-factor", type=float, default=4.0)
    ap.add_argument("--system", help="a system message before each prompt")
    ap.add_argument("--extra-body", type=lambda s: __import__("json").loads(s), default={})
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--samples", type=int, default=1,
                    help="send every request S times: each rule's summary also gives the "
                         "spread of its averages over the S samples (length_following)")
    ap.add_argument("--out", default=str(reporting.RESULTS / "decision_frontier.json"))
    ap.add_argument("--append", action="store_true",
                    help="add the rules to the --out file of an earlier sweep with the same "
                         "prompts, targets, modes and sampling (its baseline is kept)")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be >= 1")
    if args.base_url and args.rules:
        ap.error("--rules starts a server per rule: give --demo, --tiny or a pair, not --base-url")
    if not args.base_url and not args.rules:
        ap.error("give --rules (or --base-url for the running server's own rule)")

    path = args.lifebench or args.prompts
    rows = prompts.spread(prompts.load_jsonl(path), args.limit)
    wording = (length_following.LIFEBENCH_WORDING if args.lifebench
               else length_following.OUR_WORDING)
    result = {**reporting.header(args), "prompt_set": path, "n_prompts": len(rows), "rules": []}
    if args.append:
        result = _earlier(args, result)
    for i, rule in enumerate(args.rules or [None]):
        first = i == 0 and not args.append
        run = run_rule(args, ap, rows, wording, rule, with_baseline=first)
        if first:
            result["baseline"] = {m: run["summary"]["averages"]["baseline"][m]
                                  for m in args.modes}
            result["baseline_records"] = [r for r in run["records"] if r["run"] == "baseline"]
            run["records"] = [r for r in run["records"] if r["run"] == "lenvm"]
        else:
            run["summary"] = with_baseline_summary(result, run["records"], args)
        result["rules"].append(run)
        reporting.write_json(args.out, result)  # partial results survive an interrupted sweep
    return reporting.finish(result, args.out, plot, report)


if __name__ == "__main__":
    main()
