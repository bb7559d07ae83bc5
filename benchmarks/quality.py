"""What following a length costs the text, measured beside every length score.

For one output (token ids of prompt and completion, and its text):
- `nll`: the base model's mean negative log-likelihood per generated token (nats), scored by
  the server itself: /generate over prompt + output with input logprobs from the prompt's last
  token on (`logprob_start_len` = len(prompt) - 1) and no new token, so no second model is
  loaded. The server's base model is the model that wrote the text; its distribution here is
  the raw one (temperature 1, no truncation, no guidance).
- `off_top3`: the share of generated tokens that were not among the base model's 3 most
  likely tokens at their position (same scoring request, `top_logprobs_num` = 3).
- `repetitive`: whether some 3-unit phrase occurs 3 or more times in the text (units: words
  split on whitespace for English, CJK characters for Chinese, punctuation ignored).
- `degenerate`: whether the text has fallen into a loop: fewer than half of its 4-unit phrases
  are distinct ("made made made made ..."). `repetitive` also flags natural text that reuses
  a phrase ("the number of chickens" three times in a word problem); `degenerate` does not.
- `abrupt`: whether the output was ended by a stop token that the base model gave under 1%
  at that position (its NLL > ln 100): an end forced mid-sentence (e.g. `at_most`'s stop token
  at the last token of the budget), not one the model would have written. Only for outputs
  that end with a stop token (finish_reason "stop"; our benchmarks send no stop strings).
Summaries average `nll` over tokens within an output, then over outputs (every output counts
once); `repetition` is the share of repetitive outputs, `off_top3` the share of tokens,
`abrupt` the share of outputs that end abruptly.
`nll_head` is the same NLL over each output's first `target` tokens only: outputs that ramble
on into loops (a small model's prompt-only baseline runs to max_tokens often) have a low NLL
because loops are likely text, so the head compares texts of the length that was asked for.
Records keep `nll_tokens` (per token, 3 decimals) for any other cut.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Optional

from benchmarks import client, metrics

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def units(text: str) -> list[str]:
    """Words (lowercased) outside CJK runs, one unit per CJK character."""
    out = []
    for piece in WORD.findall(text.lower()):
        if CJK.search(piece):
            out.extend(ch for ch in piece if not ch.isspace())
        else:
            out.append(piece)
    return out


def repetitive(text: str, n: int = 3, times: int = 3) -> bool:
    u = units(text)
    grams = Counter(tuple(u[i:i + n]) for i in range(len(u) - n + 1))
    return any(c >= times for c in grams.values())


def degenerate(text: str, n: int = 4, distinct_below: float = 0.5) -> bool:
    u = units(text)
    grams = [tuple(u[i:i + n]) for i in range(len(u) - n + 1)]
    return len(grams) >= 2 * n and len(set(grams)) < distinct_below * len(grams)


def score_tokens(url: str, prompt_ids: list[int], output_ids: list[int]) -> dict:
    """The base model's view of an output: mean NLL per token and the off-top-3 share."""
    if not output_ids:
        return {"nll": None, "off_top3": None, "scored_tokens": 0}
    r = client.post(url, "/generate", {
        "input_ids": list(prompt_ids) + list(output_ids),
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True, "logprob_start_len": len(prompt_ids) - 1,
        "top_logprobs_num": 3})
    meta = r["meta_info"]
    logprobs = meta["input_token_logprobs"][1:]  # entry 0 is the prompt's last token
    tops = meta["input_top_logprobs"][1:]
    if len(logprobs) != len(output_ids):
        raise RuntimeError(f"scored {len(logprobs)} of {len(output_ids)} output tokens")
    nll = [-lp[0] for lp in logprobs]
    off = [tok not in {t[1] for t in (top or [])} for tok, top in zip(output_ids, tops)]
    return {"nll": sum(nll) / len(nll), "off_top3": sum(off) / len(off),
            "scored_tokens": len(nll), "nll_tokens": [round(x, 3) for x in nll]}


ABRUPT_NLL = math.log(100.0)  # the stop token had under 1% under the base model


def abrupt(nll_tokens: Optional[list], finish_reason: Optional[str]) -> bool:
    return finish_reason == "stop" and bool(nll_tokens) and nll_tokens[-1] > ABRUPT_NLL


def measure(url: str, prompt_ids: list[int], output_ids: list[int], text: str,
            finish_reason: Optional[str] = None) -> dict:
    scored = score_tokens(url, prompt_ids, output_ids)
    return {**scored, "repetitive": repetitive(text), "degenerate": degenerate(text),
            "abrupt": abrupt(scored.get("nll_tokens"), finish_reason)}


def head_nll(record: dict) -> Optional[float]:
    """Mean NLL over the output's first `target` tokens."""
    head = (record.get("nll_tokens") or [])[: record["target"]]
    return sum(head) / len(head) if head else None


def summarize(records: Iterable[dict]) -> dict:
    recs = [r for r in records if r.get("nll") is not None]
    tokens = sum(r["scored_tokens"] for r in recs)
    return {"nll": metrics.mean(r["nll"] for r in recs),
            "nll_head": metrics.mean(h for h in map(head_nll, recs) if h is not None),
            "repetition": metrics.mean(float(r["repetitive"]) for r in recs),
            "degenerate": metrics.mean(float(r["degenerate"]) for r in recs),
            # (records written before `abrupt` existed: recomputed from their nll_tokens)
            "abrupt": metrics.mean(float(r["abrupt"] if "abrupt" in r else
                                         abrupt(r.get("nll_tokens"), r.get("finish_reason")))
                                   for r in recs),
            "off_top3": (sum(r["off_top3"] * r["scored_tokens"] for r in recs) / tokens
                         if tokens else None)}


def gap(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b
