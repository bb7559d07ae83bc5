"""Prompt-boundary length prediction: MRE of the LenVM's predicted length against sampled lengths.

    python -m benchmarks.prediction --demo --n 16
    python -m benchmarks.prediction --base-url URL --prompts my_prompts.jsonl --n 64
    python -m benchmarks.prediction --tiny --limit 2 --n 2 --max-tokens 16     # smoke size

For each prompt (a chat with one user message), on the same server:
- L_hat: POST /v1/length/predict {"messages": ...}, the LenVM's prediction at the prompt
  boundary s_0, inverted to tokens (EOS included): L_hat = ln(1 - p(s_0)) / ln(gamma);
- L_1..L_n: completion tokens of n unguided samples (chat completions, temperature 1,
  top_p 1, as the paper's data sampling; completions cut at --max-tokens count at that length,
  and are counted in `truncated`).
The paper's target (eqs. 13-15) compares in the LenVM's own return space:
    u(L_i) = 1 - gamma^L_i,  mu_u = mean_i u(L_i),  L_GT = ln(1 - mu_u) / ln(gamma),
    MRE = mean over prompts of |L_hat - L_GT| / L_GT.
L_GT <= mean(L_i) (Jensen); we also report MRE against the plain mean length, and the error in
value space |p(s_0) - mu_u|.

Prompts: a JSONL file; each row has `messages`, or `prompt`, or `raw_data` (the user message).
Default: the bare questions (raw_data) of benchmarks/data/length_prompts.jsonl.
"""

from __future__ import annotations

import math

from benchmarks import client, metrics, parallel, prompts, reporting, servers


def l_gt(lengths: list[int], gamma: float) -> float:
    """Eqs. 13-14: the length whose return is the mean return of the samples."""
    mu_u = metrics.mean(1 - gamma ** n for n in lengths)
    return math.log1p(-mu_u) / math.log(gamma)


def predict(url: str, messages: list[dict]) -> dict:
    return client.post(url, "/v1/length/predict", {"messages": messages})


def sample(url: str, body: dict) -> dict:
    r = client.chat(url, body)
    return {"length": r["usage"]["completion_tokens"],
            "finish_reason": r["choices"][0]["finish_reason"]}


def evaluate_prompt(row: dict, pred: dict, samples: list[dict], gamma: float) -> dict:
    lengths = [s["length"] for s in samples]
    gt, mean_len = l_gt(lengths, gamma), metrics.mean(lengths)
    l_hat = pred["predicted_length"]
    return {"id": row.get("id"), "category": row.get("category"), "lang": row.get("lang"),
            "predicted_length": l_hat, "p0": pred["value"], "prompt_tokens": pred["prompt_tokens"],
            "lengths": lengths, "truncated": sum(s["finish_reason"] == "length" for s in samples),
            "l_gt": gt, "mean_length": mean_len,
            "mu_u": metrics.mean(1 - gamma ** n for n in lengths),
            "rel_err_gt": abs(l_hat - gt) / gt, "rel_err_mean": abs(l_hat - mean_len) / mean_len}


def aggregate(per_prompt: list[dict]) -> dict:
    return {"prompts": len(per_prompt),
            "mre_l_gt": metrics.mean(p["rel_err_gt"] for p in per_prompt),
            "mre_mean_length": metrics.mean(p["rel_err_mean"] for p in per_prompt),
            "mae_value": metrics.mean(abs(p["p0"] - p["mu_u"]) for p in per_prompt),
            "mean_predicted_length": metrics.mean(p["predicted_length"] for p in per_prompt),
            "mean_l_gt": metrics.mean(p["l_gt"] for p in per_prompt),
            "mean_length": metrics.mean(p["mean_length"] for p in per_prompt),
            "samples": sum(len(p["lengths"]) for p in per_prompt),
            "truncated": sum(p["truncated"] for p in per_prompt)}


def plot(result: dict, path) -> None:
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    pp = result["per_prompt"]
    groups = sorted({(p["category"] or "-", p["lang"] or "-") for p in pp})
    for cat, lang in groups:
        sel = [p for p in pp if (p["category"] or "-", p["lang"] or "-") == (cat, lang)]
        ax.scatter([p["l_gt"] for p in sel], [p["predicted_length"] for p in sel],
                   label=f"{cat}/{lang}", s=18)
    xs = [p["l_gt"] for p in pp] + [p["predicted_length"] for p in pp]
    lo, hi = max(min(xs), 1e-1), max(xs)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L_GT from samples (tokens, eq. 14)")
    ax.set_ylabel("LenVM prediction at the prompt boundary (tokens)")
    o = result["overall"]
    ax.set_title(f"MRE vs L_GT {100 * o['mre_l_gt']:.1f}%, vs mean length "
                 f"{100 * o['mre_mean_length']:.1f}% (n={result['settings']['n']})", fontsize=9)
    ax.legend(fontsize=7)
    reporting.save_figure(fig, path)


def report(result: dict) -> str:
    rows = [[name, g["prompts"], 100 * g["mre_l_gt"], 100 * g["mre_mean_length"], g["mae_value"],
             g["mean_predicted_length"], g["mean_l_gt"], g["mean_length"], g["truncated"]]
            for name, g in [("all", result["overall"]), *result["by_group"].items()]]
    return "\n".join([reporting.machine_line(result["machine"]), f"gamma {result['gamma']}, "
                      f"n = {result['settings']['n']} samples per prompt", "",
                      reporting.md_table(["group", "prompts", "MRE vs L_GT %", "MRE vs mean %",
                                          "abs(p0 - mu_u)", "mean L_hat", "mean L_GT", "mean L",
                                          "truncated"], rows)])


def main(argv=None) -> dict:
    ap = servers.parser(__doc__)
    prompts.add_sampling_args(ap, n=16, n_help="samples per prompt (the paper: 64)",
                              max_tokens=2048)
    ap.add_argument("--out", default=str(reporting.RESULTS / "prediction.json"))
    args = ap.parse_args(argv)

    rows = prompts.spread(prompts.load_jsonl(args.prompts), args.limit)
    result = reporting.header(args)
    with servers.lenvm_server(args, ap) as srv:
        url = srv["url"]
        result["server"] = servers.server_info(url)
        model = servers.model_name(url)
        messages = [prompts.plain_messages(r) for r in rows]
        # Predictions first: they are prefill-only, and then cache the prompts for the samples.
        preds = parallel.parallel_map(lambda m: predict(url, m), messages, args.concurrency,
                                      "predict")
        bodies = [prompts.sampling_body(args, model, m) for m in messages for _ in range(args.n)]
        samples = parallel.parallel_map(lambda b: sample(url, b), bodies, args.concurrency,
                                        "sample")
    gamma = preds[0]["gamma"]
    result["gamma"] = gamma
    pp = [evaluate_prompt(r, p, samples[i * args.n:(i + 1) * args.n], gamma)
          for i, (r, p) in enumerate(zip(rows, preds))]
    result["overall"] = aggregate(pp)
    groups = sorted({(p["category"], p["lang"]) for p in pp if p["category"] or p["lang"]},
                    key=str)
    result["by_group"] = {f"{c}/{lang}": aggregate([p for p in pp if (p["category"], p["lang"])
                                                    == (c, lang)]) for c, lang in groups}
    result["per_prompt"] = pp
    return reporting.finish(result, args.out, plot, report)


if __name__ == "__main__":
    main()
