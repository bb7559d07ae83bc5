"""Aborts, disconnects and hostile input leave the server serving and its pools idle."""

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests
from pools import wait_idle

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Tell me a very long story about the sea and ships."}]


def guided(max_tokens=400, **extra):
    return {"model": "m", "messages": MSG, "max_tokens": max_tokens, "length_target": 300,
            "length_mode": "at_least", "return_length_values": True, **extra}


def test_disconnect_mid_stream(server):
    wait_idle(server)
    for _ in range(3):
        with requests.post(server.url + CHAT, json={**guided(), "stream": True}, stream=True,
                           timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break  # hang up while the request is decoding
    wait_idle(server)
    assert server.post(CHAT, {"model": "m", "messages": MSG, "max_tokens": 4,
                              "length_target": 3}).status_code == 200


def test_abort_while_queued_prefilling_and_decoding(server):
    wait_idle(server)
    long_prompt = "word " * 600  # several prefill chunks (the test server chunks at 64 tokens)
    rids = [f"abort-{uuid.uuid4().hex}" for _ in range(12)]
    bodies = [{"text": long_prompt if i % 2 else "Tell a story", "rid": rid,
               "sampling_params": {"max_new_tokens": 300, "length_target": 250,
                                   "length_mode": "at_least", "return_length_values": True}}
              for i, rid in enumerate(rids)]
    results = {}

    def send(body):
        r = requests.post(server.url + "/generate", json=body, timeout=120)
        results[body["rid"]] = r.status_code

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for i, rid in enumerate(rids):  # staggered: some queued, some prefilling, some decoding
        time.sleep(0.05 * i)
        requests.post(server.url + "/abort_request", json={"rid": rid}, timeout=30)
    for t in threads:
        t.join(timeout=120)
    assert len(results) == len(rids)
    wait_idle(server)


def test_requests_hitting_max_tokens_and_flush(server):
    wait_idle(server)
    with ThreadPoolExecutor(6) as ex:
        outs = list(ex.map(lambda i: server.post(CHAT, {
            "model": "m", "messages": MSG, "max_tokens": 20 + i, "beta": 5.0, "ignore_eos": True,
            "return_length_values": True}).json(), range(6)))
    for i, o in enumerate(outs):
        assert o["choices"][0]["finish_reason"] == "length"
        assert o["usage"]["completion_tokens"] == 20 + i
    s = wait_idle(server)
    assert s["evictable_slots"] > 0  # finished requests' KV stays in the radix cache
    assert requests.post(server.url + "/flush_cache?timeout=30", timeout=60).status_code == 200
    s = wait_idle(server)
    assert s["free_slots"] == s["kv_pool_tokens"]


def test_malformed_bodies_never_500(server):
    cases = [b"{", b"[]", b"null", b'{"messages": 5}', json.dumps({"model": "m", "messages": MSG,
             "length_target": [1, 2]}).encode(), json.dumps({"model": "m", "messages": MSG,
             "beta": {"x": 1}}).encode(), b'{"model": "m", "prompt": "x", "beta": NaN}',
             json.dumps({"model": "m", "messages": [], "length_target": 5}).encode(),
             b'{"custom_params": ' * 5000 + b'1' + b'}' * 5000,  # deeper than json's recursion
             b'{"a": ' + b'[' * 900 + b']' * 900 + b'}']
    for path in (CHAT, "/v1/completions", "/generate", "/invocations", "/v1/embeddings"):
        for body in cases:
            r = requests.post(server.url + path, data=body,
                              headers={"content-type": "application/json"}, timeout=60)
            assert r.status_code < 500, (path, body, r.status_code, r.text)
    assert server.post(CHAT, {"model": "m", "messages": MSG, "max_tokens": 3}).status_code == 200


def test_nan_values_fall_back_for_that_request_only(models, tmp_path):
    """A LenVM that yields NaN for one request: that request is sampled unguided and says so;
    the requests batched with it are guided as usual. (The prompts share no prefix: through
    the radix cache a later request can share a poisoned request's KV; it then falls back too.)"""
    from transformers import AutoTokenizer

    from sglang_lenvm.testing import tiny_models as tm
    from sglang_lenvm.testing.server_process import Server

    tok = AutoTokenizer.from_pretrained(str(models / "ctok"))
    broken = tok.convert_tokens_to_ids("S")
    tm.build_oracle_lenvm(tmp_path / "nan_oracle", models / "ctok", nan_token=broken)
    no_s = {str(broken): -1000.0}  # nobody may sample (or score) the broken token
    with Server(["--model-path", str(models / "cbase"), "--lenvm-path",
                 str(tmp_path / "nan_oracle"), "--lenvm-top-k", "48", "--lenvm-plausibility",
                 "0"], tmp_path / "nan.log") as s:  # (as conftest's oracle_server: exactness)
        def run(prompt, target):
            return s.post("/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 40,
                                              "length_target": target, "logit_bias": no_s}).json()

        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda a: run(*a), [("xyzS", 10), ("abc", 7), ("mno", 12),
                                                   ("Sqr", 5)]))
            # at_least's floor needs no LenVM: it holds on the steps that fall back too
            floor = s.post("/v1/completions", {"model": "m", "prompt": "Sab", "max_tokens": 40,
                                               "length_target": 30, "length_mode": "at_least",
                                               "logit_bias": no_s}).json()
        assert "warning" in floor["choices"][0]["length_control"]
        assert floor["usage"]["completion_tokens"] >= 30
        for out, (target, poisoned) in zip(outs, [(10, True), (7, False), (12, False), (5, True)]):
            lc = out["choices"][0]["length_control"]
            if poisoned:
                assert "warning" in lc and "non-finite" in lc["warning"]
            else:
                assert "warning" not in lc
                assert out["usage"]["completion_tokens"] == target


def test_soak_smoke(server, tmp_path):
    """benchmarks/soak.py end to end in a few seconds: its checks pass and its report is sane."""
    from benchmarks import soak

    out = tmp_path / "soak.json"
    rc = soak.main(["--base-url", server.url, "--server-pid", str(server.proc.pid),
                    "--seconds", "8", "--baseline-seconds", "4", "--clients", "4",
                    "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["checks"]
    assert report["requests"]["mixed"] > 0 and report["failed_valid_requests"] == 0
