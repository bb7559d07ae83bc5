"""The OpenAI-compatible API: our fields are read, validated (400 naming the field) and work
with SGLang's other features; responses report what was asked and predicted."""

import json
import math

import pytest
import requests

import sglang_lenvm.api as api
from sglang_lenvm.config import LenVMConfig
from sglang_lenvm.schema import RequestError, parse_public

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Tell me about the sea"}]


def parse(fields, **sampling):
    return parse_public(fields, sampling, max_top_k=64, context_len=4096)


def rewrite_body(path, body, *, lenvm_loaded=True, method="POST"):
    old = api._config
    api.configure(LenVMConfig(lenvm_path="/x") if lenvm_loaded else None)
    try:
        import sglang_lenvm.httputil as hu
        orig, hu.context_len = hu.context_len, lambda: 4096
        try:
            api.rewrite_body(method, path, body)
            return body
        finally:
            hu.context_len = orig
    finally:
        api.configure(old)


@pytest.mark.parametrize("fields,param", [
    ({"length_target": "10"}, "length_target"), ({"length_target": 10.5}, "length_target"),
    ({"length_target": True}, "length_target"), ({"length_target": 0}, "length_target"),
    ({"length_target": 10**9}, "length_target"),
    ({"length_mode": "equal"}, "length_mode"),
    ({"length_target": 5, "length_mode": "around"}, "length_mode"),
    ({"beta": math.nan}, "beta"), ({"beta": math.inf}, "beta"), ({"beta": 1e9}, "beta"),
    ({"beta": "1"}, "beta"), ({"length_target": 5, "beta": 1.0}, "beta"),
    ({"return_length_values": "yes"}, "return_length_values"),
])
def test_parse_rejects(fields, param):
    with pytest.raises(RequestError) as e:
        parse(fields)
    assert e.value.param == param, fields


def test_parse_defaults_and_rejections():
    assert parse({}) is None
    assert parse({"beta": 0, "return_length_values": False}) is None
    p = parse({"length_target": 10})
    assert p.mode == "equal" and p.target == 10 and p.beta == 0.0
    assert parse({"beta": -2}).mode is None
    assert parse({"length_target": 5}, temperature=0).greedy is True
    with pytest.raises(RequestError) as e:
        parse({"length_target": 50}, max_tokens=20)
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestError) as e:
        parse({"length_target": 5, "length_mode": "at_most"}, top_k=100)
    assert e.value.param == "top_k"
    assert parse({"length_target": 50, "length_mode": "at_most"}, max_tokens=20).target == 50


def test_rewrite_moves_fields_and_caps_at_most():
    body = rewrite_body("/v1/chat/completions",
                        {"messages": MSG, "length_target": 8, "length_mode": "at_most",
                         "max_tokens": 100, "extra_key": "tenant-a"})
    assert "length_target" not in body and body["max_tokens"] == 8
    assert body["custom_params"]["__lenvm"]["target"] == 8
    assert body["extra_key"] == "tenant-a"  # the scheduler grants the LenVM namespace
    g = rewrite_body("/generate", {"text": "x", "sampling_params": {"length_target": 4,
                                                                    "max_new_tokens": 9}})
    assert g["sampling_params"]["custom_params"]["__lenvm"]["target"] == 4
    # Without a limit of its own, the target sets the budget (not /generate's default of 128).
    g = rewrite_body("/generate", {"text": "x", "sampling_params": {"length_target": 500}})
    wire = g["sampling_params"]["custom_params"]["__lenvm"]
    assert wire["budget"] == 625 and not wire["budget_open"]  # ceil(1.25 x 500), equal
    with pytest.raises(RequestError) as e:
        rewrite_body("/generate", {"text": "x", "sampling_params": {"length_target": 500,
                                                                    "max_new_tokens": 128}})
    assert e.value.param == "max_new_tokens"
    with pytest.raises(RequestError) as e:  # the LenVM reads token ids only
        rewrite_body("/generate", {"input_embeds": [[0.1, 0.2]], "sampling_params": {
            "length_target": 4}})
    assert e.value.param == "input_embeds"
    with pytest.raises(RequestError) as e:
        rewrite_body(CHAT, {"messages": MSG, "beta": -1.0}, lenvm_loaded=False)
    assert e.value.param == "beta" and "without one" in str(e.value)
    with pytest.raises(RequestError) as e:
        rewrite_body(CHAT, {"messages": MSG, "custom_params": {"__lenvm": {}}})
    assert e.value.param == "custom_params.__lenvm"


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": MSG, "n": 16165}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 10**7}, "best_of"),
    ("/v1/completions", {"prompt": "x", "n": 1e9}, "n"),
    ("/generate", {"text": "x", "sampling_params": {"n": 129}}, "n"),
    ("/generate", {"text": ["x", "y"], "sampling_params": [{"n": 1}, {"n": 10**6}]}, "n"),
    ("/vertex_generate", {"instances": [{"text": "x"}],
                          "parameters": {"sampling_params": {"n": 500}}}, "n"),
    ("/v1/responses", {"input": "x", "n": 500}, "n"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_sample_counts_above_the_cap_are_refused(path, body, param):
    with pytest.raises(RequestError) as e:  # with or without a LenVM: a guard of the server
        rewrite_body(path, body, lenvm_loaded=False)
    assert e.value.param == param and "--lenvm-max-n" in str(e.value)


def test_sample_counts_within_the_cap_pass():
    body = {"messages": MSG, "n": 128, "best_of": True}
    assert rewrite_body(CHAT, body, lenvm_loaded=False)["n"] == 128
    assert rewrite_body("/generate", {"text": "x", "sampling_params": {"n": "many"}},
                        lenvm_loaded=False)  # wrong types: SGLang's own validation answers


def test_middleware_without_lenvm_returns_400():
    """The ASGI middleware in front of an app, on a server started without --lenvm-path."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def echo(request):
        return JSONResponse(await request.json())

    app = Starlette(routes=[Route(CHAT, echo, methods=["POST"])])
    app.add_middleware(api.LengthFieldsMiddleware)
    old = api._config
    api.configure(None)
    try:
        client = TestClient(app)
        r = client.post(CHAT, json={"messages": MSG, "length_target": 5})
        assert r.status_code == 400 and r.json()["param"] == "length_target"
        r = client.post(CHAT, json={"messages": MSG, "temperature": 0.5})
        assert r.status_code == 200 and r.json() == {"messages": MSG, "temperature": 0.5}
    finally:
        api.configure(old)


def _echo_client():
    """The middleware in front of an app that echoes the body SGLang would see."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def echo(request):
        return JSONResponse(await request.json())

    async def models(request):
        return JSONResponse({"data": []})

    app = Starlette(routes=[Route(p, echo, methods=["POST", "PUT"]) for p in
                            (CHAT, "/v1/completions", "/generate", "/vertex_generate",
                             "/v1/embeddings")] + [Route("/v1/models", models)])
    app.add_middleware(api.LengthFieldsMiddleware)
    return TestClient(app)


def test_length_fields_in_the_header():
    """X-Length-Control carries the fields through proxies that rebuild bodies (SGLang's
    router drops unknown body fields on chat and /generate, and forwards headers)."""
    old = api._config
    api.configure(LenVMConfig(lenvm_path="/x"))
    try:
        client = _echo_client()
        h = {"X-Length-Control": json.dumps({"length_target": 8, "length_mode": "at_most"})}
        body = client.post(CHAT, json={"messages": MSG, "max_tokens": 100}, headers=h).json()
        assert "length_target" not in body and body["max_tokens"] == 8
        assert body["custom_params"]["__lenvm"]["target"] == 8
        g = client.post("/generate", json={"text": "x", "sampling_params": {
            "max_new_tokens": 20}}, headers=h).json()
        assert g["sampling_params"]["custom_params"]["__lenvm"]["mode"] == "at_most"
        v = client.post("/vertex_generate", json={"instances": [{"text": "x"}]},
                        headers=h).json()
        assert v["parameters"]["sampling_params"]["custom_params"]["__lenvm"]["target"] == 8
        plain = client.post(CHAT, json={"messages": MSG}).json()
        assert plain == {"messages": MSG}  # no header, no fields: the body is untouched
    finally:
        api.configure(old)


@pytest.mark.parametrize("method,path,header,body,param", [
    ("POST", CHAT, "{not json", {"messages": MSG}, "X-Length-Control"),
    ("POST", CHAT, "[8]", {"messages": MSG}, "X-Length-Control"),
    ("POST", CHAT, '{"length_target": 8, "top_k": 3}', {"messages": MSG}, "X-Length-Control"),
    ("POST", CHAT, '{"length_target": 8}', {"messages": MSG, "length_target": 9},
     "length_target"),
    ("POST", CHAT, '{"length_target": 0}', {"messages": MSG}, "length_target"),
    ("POST", "/v1/embeddings", '{"length_target": 8}', {"input": "x"}, "X-Length-Control"),
    ("GET", "/v1/models", '{"length_target": 8}', None, "X-Length-Control"),
])
def test_bad_length_header_gets_400(method, path, header, body, param):
    old = api._config
    api.configure(LenVMConfig(lenvm_path="/x"))
    try:
        r = _echo_client().request(method, path, json=body,
                                   headers={"X-Length-Control": header})
        assert r.status_code == 400 and r.json()["param"] == param, r.text
    finally:
        api.configure(old)


BAD = [
    ({"length_target": "10"}, "length_target"),
    ({"length_target": 0}, "length_target"),
    ({"length_target": -5}, "length_target"),
    ({"length_target": 10**12}, "length_target"),
    ({"length_target": 5, "length_mode": "exactly"}, "length_mode"),
    ({"length_mode": "at_most"}, "length_mode"),
    ({"beta": float("nan")}, "beta"),
    ({"beta": float("inf")}, "beta"),
    ({"beta": 1e300}, "beta"),
    ({"length_target": 5, "beta": 2.0}, "beta"),
    ({"return_length_values": 1}, "return_length_values"),
    ({"length_target": 5, "top_k": 1000}, "top_k"),
    ({"length_target": 50, "max_tokens": 10}, "max_tokens"),
]


@pytest.mark.parametrize("fields,param", BAD)
@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_bad_inputs_get_400_and_the_server_keeps_serving(server, path, fields, param):
    base = {"model": "m", "max_tokens": 20}
    base.update({"messages": MSG} if path == CHAT else {"prompt": "Tell me about the sea"})
    body = {**base, **fields}
    r = requests.post(server.url + path, data=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, (fields, r.text)
    assert r.json()["param"] == param, (fields, r.json())
    r = server.post(path, {**base, "length_target": 6, "max_tokens": 8})
    assert r.status_code == 200


def test_chat_reports_target_and_prediction(server):
    r = server.post(CHAT, {"model": "m", "messages": MSG, "max_tokens": 30, "length_target": 12,
                           "return_length_values": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lc = choice["length_control"]
    assert lc["length_target"] == 12 and lc["length_mode"] == "equal" and lc["beta"] == 0.0
    assert lc["predicted_length"] > 0
    assert len(lc["values"]) == r.json()["usage"]["completion_tokens"]
    assert all(0 <= v <= 1 for v in lc["values"])
    plain = server.post(CHAT, {"model": "m", "messages": MSG, "max_tokens": 5}).json()
    assert "length_control" not in plain["choices"][0]


def test_stream_matches_non_stream(server):
    body = {"model": "m", "messages": MSG, "max_tokens": 16, "temperature": 0,
            "length_target": 10, "return_length_values": True}
    full = server.post(CHAT, body).json()
    r = requests.post(server.url + CHAT, json={**body, "stream": True}, stream=True, timeout=120)
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    lc = [c["choices"][0]["length_control"] for c in chunks
          if c["choices"] and "length_control" in c["choices"][0]]
    assert text == full["choices"][0]["message"]["content"]
    assert len(lc) == 1
    assert lc[0]["values"] == pytest.approx(full["choices"][0]["length_control"]["values"])


def test_guidance_with_n_logprobs_stop_and_regex(server):
    r = server.post(CHAT, {"model": "m", "messages": MSG, "max_tokens": 20, "n": 3,
                           "logprobs": True, "top_logprobs": 2, "length_target": 8,
                           "length_mode": "at_most"})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 3
    for c in choices:
        assert c["length_control"]["length_target"] == 8 and c["logprobs"]["content"]
    # equal and at_least with n > 1 (SGLang first sends a prefill-only copy of the prompt)
    for mode, limit in (("equal", {}), ("at_least", {"max_tokens": 12}), ("equal", {"max_tokens": 20})):
        r = server.post(CHAT, {"model": "m", "messages": MSG, "n": 2, "length_target": 6,
                               "length_mode": mode, **limit})
        assert r.status_code == 200, (mode, r.text)
        assert len(r.json()["choices"]) == 2
    r = server.post("/v1/completions", {"model": "m", "prompt": "Digits:", "max_tokens": 12,
                                         "regex": "[0-9]{3,6}", "length_target": 4,
                                         "length_mode": "at_least"})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text.isdigit() and 3 <= len(text) <= 6


def test_radix_reuse_skips_lenvm_prefill(server):
    prompt = "Shared system prompt. " + " ".join(f"rule {i}: be nice." for i in range(50))
    def stats():
        return server.get("/lenvm/stats").json()[0]["mirror_extend_tokens"]

    body = {"model": "m", "prompt": prompt, "max_tokens": 3, "return_length_values": True}
    before = stats()
    first = server.post("/v1/completions", body).json()
    mid = stats()
    second = server.post("/v1/completions", body).json()
    after = stats()
    n_prompt = first["usage"]["prompt_tokens"]
    assert mid - before >= n_prompt
    assert after - mid <= 2, (before, mid, after)  # only the last prompt token is recomputed
    assert second["choices"][0]["length_control"]["values"][0] == pytest.approx(
        first["choices"][0]["length_control"]["values"][0], abs=1e-5)


def test_length_predict_endpoint(server):
    r = server.post("/v1/length/predict", {"messages": MSG})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["predicted_length"] == pytest.approx(
        math.log1p(-out["value"]) / math.log(out["gamma"]), rel=1e-6)
    chat = server.post(CHAT, {"model": "m", "messages": MSG, "max_tokens": 4,
                              "return_length_values": True}).json()
    assert chat["choices"][0]["length_control"]["values"][0] == pytest.approx(out["value"], abs=1e-5)
    assert server.post("/v1/length/predict", {"prompt": ""}).status_code == 400
    assert server.post("/v1/length/predict", {}).status_code == 400
    assert server.post("/v1/length/predict", {"messages": "hi"}).json()["param"] == "messages"


def test_edge_prompts_with_guidance(server):
    """An empty chat message works (the chat template is not empty); an empty completion prompt
    and an over-long prompt get SGLang's own 400, as without guidance."""
    r = server.post("/v1/completions", {"model": "m", "prompt": "", "max_tokens": 8,
                                         "length_target": 5})
    assert r.status_code == 400 and "empty" in r.json()["message"], r.text
    r = server.post(CHAT, {"model": "m", "messages": [{"role": "user", "content": ""}],
                           "max_tokens": 8, "length_target": 5})
    assert r.status_code == 200, r.text
    too_long = "word " * 5000  # the tiny models' context is 4096 tokens
    r = server.post("/v1/completions", {"model": "m", "prompt": too_long, "max_tokens": 8,
                                         "length_target": 5})
    assert r.status_code == 400, r.text
    assert server.post(CHAT, {"model": "m", "messages": MSG, "max_tokens": 3}).status_code == 200
