"""The length contract on every route SGLang serves: the public fields work or get a 400
naming them; the private key gets a 400 everywhere; budgets follow the target."""

import copy
import json
import math
import uuid

import pytest
import requests
from pools import stats

MSG = [{"role": "user", "content": "Tell me about the sea"}]
PRIVATE = {"custom_params": {"__lenvm": {"mode": "equal", "target": None}}}
T = 5  # at_most target; with ignore_eos every guided route must give exactly T tokens


def completion_tokens(path, body):
    if path in ("/v1/chat/completions", "/v1/completions", "/invocations"):
        assert "length_control" in body["choices"][0], body
        return body["usage"]["completion_tokens"]
    if path == "/vertex_generate":
        pred = body["predictions"]
        return (pred[0] if isinstance(pred, list) else pred)["meta_info"]["completion_tokens"]
    return body["meta_info"]["completion_tokens"]


# (method, path, request body with the public fields, the same request with the private key)
CP = PRIVATE["custom_params"]
GUIDED = [
    ("POST", "/v1/chat/completions",
     {"model": "m", "messages": MSG, "max_tokens": 40, "ignore_eos": True,
      "length_target": T, "length_mode": "at_most"},
     {"model": "m", "messages": MSG, "max_tokens": 4, **PRIVATE}),
    ("POST", "/v1/completions",
     {"model": "m", "prompt": "The sea", "max_tokens": 40, "ignore_eos": True,
      "length_target": T, "length_mode": "at_most"},
     {"model": "m", "prompt": "The sea", "max_tokens": 4, **PRIVATE}),
    ("POST", "/invocations",
     {"model": "m", "messages": MSG, "max_tokens": 40, "ignore_eos": True,
      "length_target": T, "length_mode": "at_most"},
     {"model": "m", "messages": MSG, "max_tokens": 4, **PRIVATE}),
    ("POST", "/generate",
     {"text": "The sea", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True,
                                             "length_target": T, "length_mode": "at_most"}},
     {"text": "The sea", "sampling_params": {"max_new_tokens": 4, "custom_params": CP}}),
    ("PUT", "/generate",
     {"text": "The sea", "length_target": T, "length_mode": "at_most",
      "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}},
     {"text": "The sea", "sampling_params": {"max_new_tokens": 4, "custom_params": CP}}),
    ("POST", "/vertex_generate",
     {"instances": [{"text": "The sea"}],
      "parameters": {"sampling_params": {"max_new_tokens": 40, "ignore_eos": True,
                                         "length_target": T, "length_mode": "at_most"}}},
     {"instances": [{"text": "The sea"}],
      "parameters": {"sampling_params": {"max_new_tokens": 4, "custom_params": CP}}}),
]

REFUSED = [
    ("POST", "/v1/responses", {"model": "m", "input": "hi"}),
    ("POST", "/v1/messages", {"model": "m", "max_tokens": 8, "messages": MSG}),
    ("POST", "/api/chat", {"model": "m", "messages": MSG}),
    ("POST", "/api/generate", {"model": "m", "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": "m", "input": "hi"}),
    ("POST", "/v1/score", {"model": "m", "query": "a", "items": ["b"]}),
    ("POST", "/v1/rerank", {"query": "a", "documents": ["b"]}),
    ("POST", "/encode", {"text": "hi"}),
    ("POST", "/classify", {"text": "hi"}),
    ("POST", "/v1/tokenize", {"model": "m", "prompt": "hi"}),
]


def send(server, method, path, body):
    return requests.request(method, server.url + path, json=body, timeout=120)


@pytest.mark.parametrize("method,path,body,private", GUIDED, ids=[f"{m} {p}" for m, p, *_ in GUIDED])
def test_guided_routes_follow_the_target(server, method, path, body, private):
    r = send(server, method, path, body)
    assert r.status_code == 200, r.text
    assert completion_tokens(path, r.json()) == T


@pytest.mark.parametrize("method,path,body,private", GUIDED, ids=[f"{m} {p}" for m, p, *_ in GUIDED])
def test_guided_routes_refuse_the_private_key(server, method, path, body, private):
    r = send(server, method, path, private)
    assert r.status_code == 400, r.text
    assert r.json()["param"] == "custom_params.__lenvm"


@pytest.mark.parametrize("method,path,body", REFUSED, ids=[p for _, p, _ in REFUSED])
def test_other_routes_refuse_length_fields_and_the_private_key(server, method, path, body):
    r = send(server, method, path, {**body, "length_target": 5})
    assert r.status_code == 400, r.text
    assert r.json()["param"] == "length_target" and "/v1/chat/completions" in r.json()["message"]
    r = send(server, method, path, {**body, **PRIVATE})
    assert r.status_code == 400 and r.json()["param"] == "custom_params.__lenvm", r.text


@pytest.mark.parametrize("method,path,body,private", GUIDED, ids=[f"{m} {p}" for m, p, *_ in GUIDED])
def test_huge_sample_counts_are_refused_before_any_work(server, method, path, body, private):
    """n = 16165 (found by the fuzz test) would hold the server for minutes: 400 at once."""
    body = copy.deepcopy(private)
    body.pop("custom_params", None)
    sp = body.get("parameters", body).get("sampling_params", body)
    sp.pop("custom_params", None)
    sp["n"] = 16165
    r = send(server, method, path, body)
    assert r.status_code == 400 and r.json()["param"] == "n", r.text


@pytest.mark.parametrize("method,path,body,private", GUIDED, ids=[f"{m} {p}" for m, p, *_ in GUIDED])
@pytest.mark.parametrize("field,value", [("top_k", 2**31), ("top_k", 1e20),
                                         ("sampling_seed", 2**64)])
def test_values_the_scheduler_cannot_hold_are_refused(server, method, path, body, private,
                                                      field, value):
    """An unguided top_k of 2**31 (found by the fuzz test) overflowed the scheduler's int32
    top_k tensor and stopped the server: 400 naming the field, and the server serves on."""
    body = copy.deepcopy(private)
    body.pop("custom_params", None)
    sp = body.get("parameters", body).get("sampling_params", body)
    sp.pop("custom_params", None)
    sp[field] = value
    r = send(server, method, path, body)
    assert r.status_code == 400 and r.json()["param"] == field, r.text
    assert server.get("/health_generate").status_code == 200


def test_a_null_sample_count_is_not_given(server):
    """`"n": null` in /generate's sampling_params (found by the fuzz test) was a 500."""
    for sp in ({"max_new_tokens": 3, "n": None}, {"max_new_tokens": 3, "n": None,
                                                   "length_target": 3, "length_mode": "at_most"}):
        r = server.post("/generate", {"text": "Hi", "sampling_params": sp})
        assert r.status_code == 200, r.text
        assert len(r.json()["output_ids"]) <= 3


def test_form_fields_are_refused(server):
    r = requests.post(server.url + "/v1/audio/transcriptions",
                      files={"file": ("a.wav", b"RIFF")}, data={"length_target": "5"}, timeout=60)
    assert r.status_code == 400 and r.json()["param"] == "length_target", r.text


def chat(server, **fields):
    r = server.post("/v1/chat/completions", {"model": "m", "messages": MSG, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_budget_comes_from_the_target(server, models):
    # /v1/completions' own default is 16 tokens: a target of 40 is not cut there
    # (at_least has no limit but the context: the random model may never end, so the test
    # reads the stream past 16 tokens and hangs up instead of waiting for the end)
    with requests.post(server.url + "/v1/completions", stream=True, timeout=120, json={
            "model": "m", "prompt": f"The sea {uuid.uuid4().hex}", "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "length_target": 40, "length_mode": "at_least"}) as r:
        assert r.status_code == 200, r.text
        done = 0
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                assert all(c.get("finish_reason") is None for c in chunk["choices"]), line
                done = chunk["usage"]["completion_tokens"]
                if done >= 40:
                    break
    assert done >= 40  # no finish before the target (and far past the default of 16)
    # equal ends by ceil(1.25 T) (the overshoot limit) even when nothing stops it
    out = chat(server, length_target=8, ignore_eos=True)
    assert out["usage"]["completion_tokens"] <= math.ceil(1.25 * 8)
    # at_most without a limit: T; /generate's own default (128) does not apply
    g = server.post("/generate", {"text": "x", "sampling_params": {
        "length_target": 7, "length_mode": "at_most", "ignore_eos": True}}).json()
    assert g["meta_info"]["completion_tokens"] == 7


@pytest.mark.parametrize("extra", [
    {"max_completion_tokens": 64, "ignore_eos": True},
    {"max_completion_tokens": 64, "max_tokens": 50, "ignore_eos": True},
    {"max_tokens": 64, "logit_bias": {"2": -100}},  # EOS (<|im_end|>, id 2) banned
    {"max_tokens": 64, "ignore_eos": True, "stop": ["zzzz"]},
    {"max_tokens": 64, "ignore_eos": True, "regex": "[a-z ]{3,80}"},
], ids=["max_completion_tokens", "both_limits", "banned_eos", "stop_string", "regex"])
def test_at_most_never_exceeds_the_target(server, extra):
    out = chat(server, length_target=T, length_mode="at_most", **extra)
    assert out["usage"]["completion_tokens"] <= T


def test_max_completion_tokens_is_checked_like_max_tokens(server):
    r = server.post("/v1/chat/completions", {"model": "m", "messages": MSG, "length_target": 30,
                                              "max_completion_tokens": 10})
    assert r.status_code == 400 and r.json()["param"] == "max_completion_tokens", r.text


def _lenvm_vocab(models) -> int:
    import json

    return json.loads((models / "lenvm" / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("length", [
    pytest.param({"length_target": 6, "length_mode": "at_most"}, id="guided"),
    pytest.param({"return_length_values": True}, id="values-only"),
    pytest.param({"beta": -5.0, "return_length_values": True}, id="beta"),
])
def test_padding_ids_past_the_lenvm_are_never_sampled_by_lenvm_rows(server, models, length):
    """The base model pads its vocabulary past the tokenizer (and the LenVM's embedding):
    pushing a padding id to the top makes a plain request emit it, while a request that uses
    the LenVM never does: the LenVM could not read it at the next step (a values-only request
    once lost its value trace that way, to a quarantine)."""
    vocab = _lenvm_vocab(models)
    pad = vocab + 3
    bias = {str(pad): 50.0}
    plain = server.post("/generate", {"text": "a", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "logit_bias": bias}}).json()
    assert pad in plain["output_ids"]
    before = stats(server)
    r = server.post("/generate", {"text": "a", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0, "logit_bias": bias, **length}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert all(t < vocab for t in out["output_ids"]), out["output_ids"]
    assert stats(server)["quarantined_requests"] == before["quarantined_requests"]
    meta = out["meta_info"]
    assert not meta.get("lenvm_fault") and not any(meta.get("lenvm_fallback") or []), meta
    if length.get("return_length_values"):
        assert len(meta["lenvm_p"]) == len(out["output_ids"])
        assert all(isinstance(v, float) for v in meta["lenvm_p"]), meta["lenvm_p"]


def test_prompt_ids_past_the_lenvm_are_refused(server, models):
    """Raw input_ids the LenVM has no embedding for: a length-controlled request is refused
    (400 naming input_ids), the same prompt without length control is served."""
    ids = [5, 6, _lenvm_vocab(models) + 1, 7]
    for length in ({"length_target": 4, "length_mode": "at_most"},
                   {"return_length_values": True}):
        r = server.post("/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": 4, **length}})
        assert r.status_code == 400, r.text
        assert "input_ids" in r.text and "vocabulary" in r.text, r.text
    r = server.post("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 200, r.text


def test_unguided_requests_cost_the_lenvm_nothing_in_a_mixed_batch(server):
    """One prefill batch: a guided prompt and a longer unguided one. The LenVM mirrors the
    guided prompt's tokens only."""
    tag = uuid.uuid4().hex
    guided_text, plain_text = f"Guided {tag}", f"Plain {tag} " + "word " * 60
    before = stats(server)
    r = server.post("/generate", {"text": [guided_text, plain_text], "sampling_params": [
        {"max_new_tokens": 3, "length_target": 3, "length_mode": "at_most"},
        {"max_new_tokens": 3}]})
    assert r.status_code == 200, r.text
    guided, plain = r.json()
    after = stats(server)
    assert guided["meta_info"]["cached_tokens"] == 0
    assert plain["meta_info"]["prompt_tokens"] > guided["meta_info"]["prompt_tokens"]
    mirrored = after["mirror_extend_tokens"] - before["mirror_extend_tokens"]
    assert mirrored == guided["meta_info"]["prompt_tokens"], (mirrored, guided, plain)
    assert after["faults"] == before["faults"]  # no phase needed its row-by-row fallback


def test_intermediate_prefill_chunks_are_not_scored(server):
    """The server prefills in chunks of 64 tokens; a ~300-token guided prompt that samples one
    token runs one star forward (its last chunk), not one per chunk."""
    text = f"{uuid.uuid4().hex} " + " ".join(f"item {i} is {i * 7 % 13}." for i in range(40))
    before = stats(server)
    r = server.post("/generate", {"text": text, "sampling_params": {
        "max_new_tokens": 1, "length_target": 1, "length_mode": "at_most"}})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["prompt_tokens"] > 4 * 64
    after = stats(server)
    assert after["star_forwards"] - before["star_forwards"] == 1
