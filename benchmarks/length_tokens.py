"""Length tokens: which generated tokens move the LenVM's predicted horizon most, by TD score.

    python -m benchmarks.length_tokens --demo --n 8
    python -m benchmarks.length_tokens --base-url URL --prompts my_prompts.jsonl
    python -m benchmarks.length_tokens --tiny --limit 2 --n 2 --max-tokens 16    # smoke size

Samples plain (unguided) completions with `return_length_values` (the value trace p(s_t), the
LenVM's value before each generated token; p ~ 1 - gamma^remaining) and `logprobs` (the token
strings, one per generated token, EOS included). Token t (1-based) moves the state from
s_{t-1} to s_t; its TD score is

    s_t = gamma * p_t - p_{t-1} + (1 - gamma)        (sglang_lenvm.returns.td_score)

positive when the token makes the continuation longer than one step of progress would, negative
when it shortens it. p after EOS is 0 (terminal state), so EOS scores -p_{L-1} + (1 - gamma).
A completion cut by max_tokens has no value after its last token, which is left out.

Reported: per token string, the count and mean score over the sample; the --top tokens with the
largest positive and negative mean among those seen at least --min-count times (a table and a
bar chart), and the single occurrences with the largest |s_t| with their preceding text.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from benchmarks import client, metrics, parallel, prompts, reporting, servers
from sglang_lenvm.returns import td_score


def token_scores(choice: dict, gamma: float) -> list[tuple[str, float]]:
    """(token, s_t) for each generated token whose next state has a value."""
    tokens = [t["token"] for t in choice["logprobs"]["content"]]
    values = choice["length_control"]["values"]
    if len(tokens) != len(values):
        raise RuntimeError(f"{len(tokens)} tokens but {len(values)} values")
    p = list(values)
    if None in p:  # the trace stopped (a LenVM fault, reported in length_control.warning)
        p = p[:p.index(None)]
    elif choice["finish_reason"] == "stop":  # ended by EOS: the state after it is terminal
        p.append(0.0)
    if len(p) < 2:
        return []
    s = td_score(torch.tensor(p, dtype=torch.float64), gamma).tolist()
    return list(zip(tokens, s))  # zip drops the last token of a cut completion


def sample(url: str, body: dict, gamma: float) -> dict:
    r = client.chat(url, body)
    choice = r["choices"][0]
    return {"finish_reason": choice["finish_reason"],
            "length": r["usage"]["completion_tokens"],
            "trace_stopped": None in choice["length_control"]["values"],
            "scores": token_scores(choice, gamma)}


def aggregate(samples: list[dict], top: int, min_count: int) -> dict:
    per_token = defaultdict(list)
    for smp in samples:
        for tok, s in smp["scores"]:
            per_token[tok].append(s)
    stats = [{"token": t, "count": len(v), "mean": sum(v) / len(v), "sum": sum(v),
              "max": max(v), "min": min(v)} for t, v in per_token.items()]
    eligible = [x for x in stats if x["count"] >= min_count]
    eligible.sort(key=lambda x: x["mean"])
    positive = [x for x in reversed(eligible) if x["mean"] > 0][:top]
    negative = [x for x in eligible if x["mean"] < 0][:top]
    return {"distinct_tokens": len(stats), "eligible_tokens": len(eligible),
            "lengthening": positive, "shortening": negative}


def top_occurrences(samples: list[dict], top: int, context: int = 8) -> dict:
    occ = []
    for i, smp in enumerate(samples):
        toks = [t for t, _ in smp["scores"]]
        for j, (tok, s) in enumerate(smp["scores"]):
            occ.append({"sample": i, "position": j, "token": tok, "score": s,
                        "before": "".join(toks[max(0, j - context):j])})
    occ.sort(key=lambda o: o["score"])
    return {"lengthening": occ[::-1][:top], "shortening": occ[:top]}


def _label_font():
    """A font with CJK glyphs if the system has one (Chinese tokens), else None."""
    from matplotlib import font_manager

    for f in font_manager.fontManager.ttflist:
        if any(k in f.name for k in ("CJK", "WenQuanYi", "Droid Sans Fallback", "Heiti")):
            return f.name
    return None


def label(tok: str, glyphs: bool = True, plot: bool = False) -> str:
    """A token as readable text: control characters (and, without CJK glyphs, CJK text)
    escaped; `$` escaped for matplotlib's mathtext, `|` for markdown tables."""
    out = []
    for c in tok:
        if c.isprintable() and (glyphs or ord(c) < 0x2E80):
            out.append({"$": r"\$" if plot else "$", "|": "|" if plot else r"\|"}.get(c, c))
        else:
            out.append(c.encode("unicode_escape").decode())
    return "'" + "".join(out) + "'"


def plot(result: dict, path) -> None:
    plt = reporting.pyplot()
    font = _label_font()
    a = result["tokens"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.3 * max(len(a["lengthening"]),
                                                         len(a["shortening"]), 4) + 1.5))
    for ax, key, color in ((axes[0], "lengthening", "tab:red"),
                           (axes[1], "shortening", "tab:blue")):
        rows = a[key][::-1]  # largest |mean| at the top
        ax.barh(range(len(rows)), [r["mean"] for r in rows], color=color)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{label(r['token'], font is not None, plot=True)} ({r['count']})"
                            for r in rows], fontsize=8, **({"fontname": font} if font else {}))
        ax.set_xlabel("mean TD score s_t")
        ax.set_title(f"most {key} tokens (count >= {result['settings']['min_count']})",
                     fontsize=9)
        ax.axvline(0, color="k", lw=0.5)
    reporting.save_figure(fig, path)


def report(result: dict) -> str:
    out = [reporting.machine_line(result["machine"]),
           f"gamma {result['gamma']}, {result['n_samples']} samples, "
           f"{result['n_scored_tokens']} scored tokens", ""]
    for key in ("lengthening", "shortening"):
        rows = [[label(r["token"]), r["count"], r["mean"], r["min"], r["max"]]
                for r in result["tokens"][key]]
        out += [f"most {key}:", reporting.md_table(["token", "count", "mean s", "min", "max"],
                                                   rows), ""]
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = servers.parser(__doc__)
    prompts.add_sampling_args(ap, n=8, n_help="samples per prompt", max_tokens=1024)
    ap.add_argument("--top", type=int, default=20, help="tokens per side in the table")
    ap.add_argument("--min-count", type=int, default=3)
    ap.add_argument("--out", default=str(reporting.RESULTS / "length_tokens.json"))
    args = ap.parse_args(argv)

    rows = prompts.spread(prompts.load_jsonl(args.prompts), args.limit)
    result = reporting.header(args)
    with servers.lenvm_server(args, ap) as srv:
        url = srv["url"]
        result["server"] = servers.server_info(url)
        gamma = servers.gamma_of(url)
        model = servers.model_name(url)
        bodies = [prompts.sampling_body(args, model, prompts.plain_messages(r),
                                        return_length_values=True, logprobs=True)
                  for r in rows for _ in range(args.n)]
        samples = parallel.parallel_map(lambda b: sample(url, b, gamma), bodies,
                                        args.concurrency, "sample")
    result.update(gamma=gamma, n_samples=len(samples),
                  n_scored_tokens=sum(len(s["scores"]) for s in samples),
                  cut=sum(s["finish_reason"] == "length" for s in samples),
                  trace_stopped=sum(s["trace_stopped"] for s in samples),
                  mean_length=metrics.mean(s["length"] for s in samples))
    result["tokens"] = aggregate(samples, args.top, args.min_count)
    result["occurrences"] = top_occurrences(samples, args.top)
    return reporting.finish(result, args.out, plot, report)


if __name__ == "__main__":
    main()
