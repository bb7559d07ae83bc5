"""Accuracy vs length: LenVM exponential tilting (a beta grid) against a hard token budget, on
arithmetic word problems with checkable answers.

    python -m benchmarks.tradeoff --demo
    python -m benchmarks.tradeoff --base-url URL --problems 200 --n 8
    python -m benchmarks.tradeoff --tiny --problems 2 --n 1 --betas 0 -50 --max-tokens 16  # smoke

Problems: generated here, deterministically from --seed (no dataset is downloaded; the PyPI
packages that serve GSM8K fetch it from a hub at run time). --level gsm (default): six
templates of two to four arithmetic steps (buy and give away, bake and pack into boxes, wages
minus spending, a trip at two speeds, rows of chairs, sharing with a remainder); --level easy:
one step (add, take away, multiply), for small models. Integer answers; `problems` in the JSON
lists every question with its answer.

Prompt (the LenVM authors' math prompt): "Please reason step by step, and put your final answer
within \\boxed{}.\\n\\n" + question, as one user message. Sampling for every run: temperature 1,
top_p 1, min_p 0.01 (the paper's setting for guided runs), top_k --top-k (the candidates the
LenVM scores), --n samples per problem, max_tokens --max-tokens.

Runs:
- beta in --betas: `beta` = b on the request (p'(x) ~ p(x) exp(b v(x)), b < 0 favours shorter
  continuations; b = 0 is plain decoding). Length = completion tokens, at most max_tokens.
- hard budget B in --budgets, computed from the beta = 0 samples: a sample longer than B counts
  as wrong and its length as B (what stopping generation at B tokens would give: sampling with
  max_tokens = B yields exactly the first B tokens of such a sample). Same as the paper's
  baseline, which truncates at B and marks the example incorrect.
The x axis is the mean *truncated* length for both (beta runs are truncated by max_tokens).

Answer extraction: the content of the last \\boxed{...} in the response; without one, the whole
response. The last number in it (commas removed) is the answer; correct if it equals the
reference exactly. A response cut by max_tokens (finish_reason "length") counts as wrong.
Accuracy = Pass@1 = the mean over all samples of all problems.
"""

from __future__ import annotations

import random
import re
from typing import Optional

from benchmarks import client, metrics, parallel, quality, reporting, servers

PROMPT = "Please reason step by step, and put your final answer within \\boxed{{}}.\n\n{q}"
NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi",
         "Lena", "Mateo", "Nora", "Omar", "Priya"]
ITEMS = ["apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells"]


# ------------------------------------------------------------------------------ problems


def _buy_give(r):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(5, 40), r.randint(2, 6), r.randint(3, 12)
    d = r.randint(1, a + b * c - 1)
    return (f"{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack, and "
            f"then gives {d} {item} to a friend. How many {item} does {name} have now?",
            a + b * c - d)


def _bakery(r):
    boxes, per_box, days = r.randint(2, 6), r.randint(3, 20), r.randint(2, 7)
    rest = boxes * per_box
    per_day = -(-(rest + r.randint(5, 40)) // days)  # ceil: enough bread to sell some
    sold = per_day * days - rest
    return (f"A bakery bakes {per_day} loaves of bread every day for {days} days. It sells "
            f"{sold} of the loaves. The remaining loaves are packed equally into {boxes} "
            f"boxes. How many loaves are in each box?", per_box)


def _wages(r):
    name = r.choice(NAMES)
    rate, hours, weeks = r.randint(8, 30), r.randint(5, 40), r.randint(2, 6)
    earned = rate * hours * weeks
    spent = r.randint(1, earned - 1)
    return (f"{name} earns ${rate} per hour and works {hours} hours every week. After {weeks} "
            f"weeks, {name} spends ${spent} on a bicycle. How many dollars does {name} have "
            f"left from the earnings?", earned - spent)


def _trip(r):
    a, b, c, d = r.randint(30, 90), r.randint(2, 5), r.randint(30, 90), r.randint(1, 4)
    return (f"A train travels at {a} km per hour for {b} hours, and then at {c} km per hour "
            f"for {d} more hours. How many kilometers does it travel in total?", a * b + c * d)


def _chairs(r):
    rows, per_row = r.randint(3, 15), r.randint(4, 20)
    removed, added = r.randint(1, rows * per_row - 1), r.randint(1, 30)
    return (f"A hall has {rows} rows of {per_row} chairs. {removed} chairs are broken and "
            f"taken away, and then {added} new chairs are brought in. How many chairs are in "
            f"the hall now?", rows * per_row - removed + added)


def _share(r):
    name = r.choice(NAMES)
    friends = r.randint(2, 9)
    left, each, more = r.randint(0, friends - 1), r.randint(2, 12), r.randint(1, 25)
    total = friends * each + left
    return (f"{name} has {total} candies and shares them equally among {friends} friends, "
            f"giving each friend as many as possible and keeping the candies that are left "
            f"over. Then {name} buys {more} more candies. How many candies does {name} have "
            f"now?", left + more)


def _add(r):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 20), r.randint(2, 20)
    return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            a + b)


def _take(r):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a = r.randint(5, 30)
    b = r.randint(1, a - 1)
    return (f"{name} has {a} {item} and gives {b} of them away. How many {item} does {name} "
            f"have left?", a - b)


def _bags(r):
    item = r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    return f"There are {a} bags with {b} {item} in each bag. How many {item} are there?", a * b


# "gsm": two to four steps, GSM8K-like; "easy": one step, for small models (e.g. 135M) that
# solve almost none of the former, which would leave the plot flat at zero.
TEMPLATES = {"gsm": [_buy_give, _bakery, _wages, _trip, _chairs, _share],
             "easy": [_add, _take, _bags]}


def make_problems(n: int, seed: int, level: str = "gsm") -> list[dict]:
    r = random.Random(seed)
    templates = TEMPLATES[level]
    out = []
    for i in range(n):
        template = templates[i % len(templates)]
        q, a = template(r)
        out.append({"id": i, "template": template.__name__.strip("_"), "question": q,
                    "answer": a})
    return out


# ------------------------------------------------------------------------------ answers

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}} works)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unclosed (cut off)


def extract_answer(text: str) -> tuple[Optional[float], str]:
    """(number, how): how is "boxed", "last_number" (no box) or "none"."""
    boxed = last_boxed(text)
    where, how = (boxed, "boxed") if boxed is not None else (text, "last_number")
    nums = NUMBER.findall(where)
    if not nums:
        return None, "none"
    try:
        return float(nums[-1].replace(",", "")), how
    except ValueError:
        return None, "none"


def grade(problem: dict, r: dict) -> dict:
    choice = r["choices"][0]
    text = choice["message"]["content"] or ""
    value, how = extract_answer(text)
    finished = choice["finish_reason"] != "length"
    return {"problem": problem["id"], "length": r["usage"]["completion_tokens"],
            "finish_reason": choice["finish_reason"], "extracted": value, "extraction": how,
            "correct": bool(finished and value is not None and value == problem["answer"]),
            "text": text}


def with_quality(url: str, r: dict, graded: dict) -> dict:
    """What the text cost, beside its length (benchmarks/quality.py): the base model's NLL
    per token (and per token, for the budget rows' cuts), repetition, tokens off its top 3."""
    choice = r["choices"][0]
    return {**graded, **quality.measure(url, choice["prompt_token_ids"],
                                        choice["response_token_ids"], graded["text"],
                                        choice["finish_reason"])}


# ------------------------------------------------------------------------------ runs


def point(samples: list[dict], budget: Optional[int] = None) -> dict:
    """Accuracy and mean truncated length; with a budget, longer samples are wrong and cut."""
    cap = budget if budget is not None else float("inf")
    # A budget's text is the sample's first B tokens: its NLL is theirs (repetition and the
    # rest are of whole samples, so only the beta rows have them).
    qual = quality.summarize({**s, "target": budget} for s in samples if "nll" in s)
    qual = ({"nll": qual["nll_head"]} if budget is not None else
            {k: qual[k] for k in ("nll", "repetition", "degenerate", "off_top3")})
    return {"n": len(samples), **qual,
            "accuracy": metrics.mean(s["correct"] and s["length"] <= cap for s in samples),
            "mean_truncated_length": metrics.mean(min(s["length"], cap) for s in samples),
            "mean_length": metrics.mean(s["length"] for s in samples),
            "cut": sum(s["finish_reason"] == "length" or s["length"] > cap for s in samples),
            "extraction": {k: sum(s["extraction"] == k for s in samples)
                           for k in ("boxed", "last_number", "none")}}


def plot(result: dict, path) -> None:
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    b = result["budget"]
    xs = [v["mean_truncated_length"] for v in b.values()]
    ax.plot(xs, [100 * v["accuracy"] for v in b.values()], "s-", color="tab:blue",
            label="hard token budget")
    for B, v in b.items():
        ax.annotate(f"B={B}", (v["mean_truncated_length"], 100 * v["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, -9))
    pts = sorted(result["beta"].items(), key=lambda kv: kv[1]["mean_truncated_length"])
    ax.plot([v["mean_truncated_length"] for _, v in pts], [100 * v["accuracy"] for _, v in pts],
            "o-", color="tab:red", label="LenVM tilt")
    for beta, v in pts:
        ax.annotate(f"β={beta}", (v["mean_truncated_length"], 100 * v["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 4))
    top = max([100 * v["accuracy"] for v in [*b.values(), *result["beta"].values()]] + [0])
    ax.set_ylim(0, max(10.0, 1.1 * top))
    ax.set_xlabel("mean truncated length (tokens)")
    ax.set_ylabel("Pass@1 (%)")
    s = result["settings"]
    ax.set_title(f"{s['problems']} {s['level']} problems x {s['n']} samples, top_k {s['top_k']}, "
                 f"min_p {s['min_p']}", fontsize=9)
    ax.legend()
    reporting.save_figure(fig, path)


def report(result: dict) -> str:
    def pct(x):
        return None if x is None else 100 * x
    rows = [[f"beta {k}", 100 * v["accuracy"], v["mean_truncated_length"], v.get("nll"),
             pct(v.get("repetition")), pct(v.get("degenerate")), pct(v.get("off_top3")),
             v["cut"], v["n"]] for k, v in result["beta"].items()]
    rows += [[f"budget {k}", 100 * v["accuracy"], v["mean_truncated_length"], v.get("nll"),
              None, None, None, v["cut"], v["n"]] for k, v in result["budget"].items()]
    return "\n".join([reporting.machine_line(result["machine"]), "",
                      reporting.md_table(["run", "Pass@1 %", "mean truncated length",
                                          "NLL/token", "repetitive %", "degenerate %",
                                          "off top-3 %", "cut", "n"], rows)])


def main(argv=None) -> dict:
    ap = servers.parser(__doc__)
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level", choices=sorted(TEMPLATES), default="gsm",
                    help="gsm: 2-4 step problems; easy: one step (small models)")
    ap.add_argument("--n", type=int, default=4, help="samples per problem (the paper: 64)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0, -20, -50, -100, -1000])
    ap.add_argument("--budgets", type=int, nargs="+",
                    default=[32, 64, 96, 128, 192, 256, 384, 512])
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=15)
    ap.add_argument("--min-p", type=float, default=0.01)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default=str(reporting.RESULTS / "tradeoff.json"))
    args = ap.parse_args(argv)
    if 0 not in args.betas:  # the budget baseline is cut from the beta = 0 samples
        args.betas = [0.0] + args.betas
    budgets = [b for b in args.budgets if b <= args.max_tokens]

    problems = make_problems(args.problems, args.seed, args.level)
    result = {**reporting.header(args), "problems": problems,
              "notes": [f"budgets above --max-tokens skipped: {b}" for b in args.budgets
                        if b > args.max_tokens]}
    with servers.lenvm_server(args, ap) as srv:
        url = srv["url"]
        result["server"] = servers.server_info(url)
        model = servers.model_name(url)
        jobs = [(beta, p) for beta in args.betas for p in problems for _ in range(args.n)]

        def run(job):
            beta, p = job
            body = {"model": model, "messages": [{"role": "user",
                                                  "content": PROMPT.format(q=p["question"])}],
                    "max_tokens": args.max_tokens, "temperature": 1.0, "top_p": 1.0,
                    "min_p": args.min_p, "top_k": args.top_k, "beta": beta,
                    "return_prompt_token_ids": True, "return_token_ids": True}
            r = client.chat(url, body)
            return {"beta": beta, **with_quality(url, r, grade(p, r))}

        samples = parallel.parallel_map(run, jobs, args.concurrency, "tradeoff")
    by_beta = {b: [s for s in samples if s["beta"] == b] for b in args.betas}
    result["beta"] = {f"{b:g}": point(v) for b, v in by_beta.items()}
    result["budget"] = {str(B): point(by_beta[0], B) for B in budgets}
    result["samples"] = samples
    return reporting.finish(result, args.out, plot, report)


if __name__ == "__main__":
    main()
