"""LenVM values read through the real SGLang runtime vs a plain transformers forward.

Covers the KV mirror in every path a request can take: fresh prefill, chunked prefill (the
server runs with --chunked-prefill-size 64), radix-cache hits (incl. a prefix cached by a
prefill-only request), requests of different lengths batched together, and decode roots; plus
the values of the candidates the sampler then chose.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoTokenizer

from reference import lenvm_p, trace_reference

TOL = 1e-4
LONG = " ".join(f"item {i} is the number {i * 7 % 13}." for i in range(40))  # ~ 300 tokens


@pytest.fixture(scope="module")
def tok(models):
    return AutoTokenizer.from_pretrained(str(models / "base"))


def generate(server, text, **sp):
    r = server.post("/generate", {"text": text, "sampling_params": sp})
    assert r.status_code == 200, r.text
    return r.json()


def check_trace(models, tok, text, out):
    prompt = tok.encode(text)
    vals = out["meta_info"]["lenvm_p"]
    assert len(vals) == len(out["output_ids"])
    ref = trace_reference(models / "lenvm", prompt, out["output_ids"])
    got = torch.tensor(vals, dtype=torch.float64)
    assert (got - ref).abs().max().item() < TOL, (got - ref).abs().max()
    return prompt, ref


def test_trace_unguided_greedy(server, models, tok):
    out = generate(server, "The capital of France", max_new_tokens=16, temperature=0,
                   return_length_values=True)
    check_trace(models, tok, "The capital of France", out)
    pred = out["meta_info"]["lenvm_predicted_length"][0]
    p0 = out["meta_info"]["lenvm_p"][0]
    import math
    assert pred == pytest.approx(math.log1p(-p0) / math.log(0.997), rel=1e-6)


def test_trace_long_prompt_chunked_and_radix_hit(server, models, tok):
    first = generate(server, LONG, max_new_tokens=8, temperature=0, return_length_values=True)
    check_trace(models, tok, LONG, first)
    second = generate(server, LONG + " More", max_new_tokens=8, temperature=0,
                      return_length_values=True)
    assert second["meta_info"]["cached_tokens"] > 200  # served from the radix cache
    check_trace(models, tok, LONG + " More", second)


def test_prefix_cached_by_prefill_only_request(server, models, tok):
    text = "Prefill only: " + " ".join(f"w{i}" for i in range(60))
    generate(server, text, max_new_tokens=0, return_length_values=True)
    out = generate(server, text + " and then", max_new_tokens=6, temperature=0,
                   return_length_values=True)
    assert out["meta_info"]["cached_tokens"] > 50
    check_trace(models, tok, text + " and then", out)


def test_batched_requests_of_different_lengths(server, models, tok):
    texts = ["Hi", "The capital of France", LONG[:400], "Count: 1 2 3 4 5 6", LONG[:90]]
    modes = [{}, {"length_target": 9}, {"length_target": 5, "length_mode": "at_most"},
             {"beta": -3.0}, {"length_target": 12, "length_mode": "at_least"}]
    with ThreadPoolExecutor(len(texts)) as ex:
        outs = list(ex.map(lambda a: generate(server, a[0], max_new_tokens=14, temperature=1.0,
                                              return_length_values=True, **a[1]),
                           zip(texts, modes)))
    for text, out in zip(texts, outs):
        check_trace(models, tok, text, out)


def test_chosen_candidate_values(server, models, tok):
    """The values the LenVM gave the tokens that were then chosen (star-tree candidates)."""
    text = "Write a story"
    out = generate(server, text, max_new_tokens=12, temperature=1.0, length_target=10,
                   length_mode="at_least", return_length_values=True)
    prompt = tok.encode(text)
    chosen = out["meta_info"]["lenvm_p_chosen"]
    ref = lenvm_p(models / "lenvm", prompt + out["output_ids"])
    P = len(prompt)
    checked = 0
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for t, c in enumerate(chosen):
        if c is not None:
            # a stop token ends the output: its value is 0 by definition, not the forward's
            want = 0.0 if out["output_ids"][t] == eos else ref[P + t].item()
            assert abs(c - want) < TOL
            checked += 1
    assert checked == len(out["output_ids"])  # every sampled token was a scored candidate


def test_stats_counters(server):
    stats = server.get("/lenvm/stats").json()[0]
    assert stats["star_forwards"] > 0 and stats["candidates_scored"] > 0
    assert stats["gamma"] == 0.997 and stats["default_top_k"] == 15
    assert stats["equal_distance"] == "ratio" and stats["equal_max_overshoot"] == 0.25


def test_only_candidates_inside_the_truncation_are_scored(server):
    """min_p = 1 keeps only the most likely token: one LenVM candidate per step, not top_k
    (without it: up to top_k, those under the plausibility floor left out)."""
    def scored(**sp):
        before = server.get("/lenvm/stats").json()[0]["candidates_scored"]
        out = generate(server, "one candidate", max_new_tokens=6, temperature=1.0,
                       length_target=6, length_mode="at_least", top_k=5, **sp)
        assert len(out["output_ids"]) == 6
        return server.get("/lenvm/stats").json()[0]["candidates_scored"] - before

    assert 6 < scored() <= 5 * 6  # prefill step + 5 decode steps, up to 5 candidates each
    assert scored(min_p=1.0) == 6


def test_each_row_pays_for_its_own_tree(server, models, tok):
    """Star trees are packed: a top_k 12 request in the batch does not give a top_k 2 one,
    or one that only reports values, a 13-token tree (the forward runs at most 133 tokens
    here, not 309: fewer where candidates fall under the plausibility floor), and the packed
    forward gives every chosen candidate its transformers value."""
    texts = ["Write a story", "Tell me a tale", "Values only, please"]
    guided = {"max_new_tokens": 8, "temperature": 1.0, "length_target": 8,
              "length_mode": "at_least", "return_length_values": True}
    params = [{**guided, "top_k": 12}, {**guided, "top_k": 2},
              {"max_new_tokens": 8, "ignore_eos": True, "return_length_values": True}]
    before = server.get("/lenvm/stats").json()[0]["star_tokens"]
    r = server.post("/generate", {"text": texts, "sampling_params": params})
    assert r.status_code == 200, r.text
    outs = r.json()
    # per request: prefill (candidates only) + 7 decode steps of root + candidates (at least
    # the most likely one, at most top_k)
    tokens = server.get("/lenvm/stats").json()[0]["star_tokens"] - before
    assert (1 + 7 * 2) * 2 + 7 <= tokens <= (12 + 7 * 13) + (2 + 7 * 3) + 7
    for text, out in zip(texts, outs):
        assert len(out["output_ids"]) == 8
        check_trace(models, tok, text, out)
    for text, out in zip(texts[:2], outs[:2]):
        prompt = tok.encode(text)
        ref = lenvm_p(models / "lenvm", prompt + out["output_ids"])
        chosen = out["meta_info"]["lenvm_p_chosen"]
        assert all(abs(c - ref[len(prompt) + t].item()) < TOL for t, c in enumerate(chosen))


def test_a_step_over_the_star_token_bound_runs_several_forwards(server, models, tok):
    """The shared server bounds a star forward at 66 tokens (--lenvm-max-star-tokens): five
    top_k 15 requests in one step (5 x 17 tokens) run in groups, and every value is still
    the transformers value."""
    texts = [f"Story number {i}:" for i in range(5)]
    params = [{"max_new_tokens": 5, "temperature": 1.0, "length_target": 5, "top_k": 15,
               "length_mode": "at_least", "return_length_values": True}] * 5
    (before,) = server.get("/lenvm/stats").json()
    r = server.post("/generate", {"text": texts, "sampling_params": params})
    assert r.status_code == 200, r.text
    (after,) = server.get("/lenvm/stats").json()
    tokens = after["star_tokens"] - before["star_tokens"]
    forwards = after["star_forwards"] - before["star_forwards"]
    # prefill trees of up to 15, then 4 decode steps of 1 + up to 15 (candidates under the
    # plausibility floor, and stop tokens, value 0 by definition, are never computed)
    assert 5 * (1 + 4 * 2) <= tokens <= 5 * (15 + 4 * 16)
    assert forwards >= -(-tokens // 66) and tokens / forwards <= 66
    for text, out in zip(texts, r.json()):
        check_trace(models, tok, text, out)
