"""Scaling out on SGLang's own parallelism: data parallelism (--dp-size 2, one LenVM and one
mirror per scheduler) and SGLang's router in front of several servers."""

from __future__ import annotations


import pytest
from pools import all_stats, wait_idle

from sglang_lenvm.testing.server_process import Server

PROMPTS = ["Tell me about the sea.", "Name three birds.", "What is a lighthouse?",
           "Count to ten, please."]


def _guided(srv, prompt):
    """Greedy `equal` and `at_most` (deterministic) plus the value trace, on /generate, each
    computed from scratch (see _fresh)."""
    out = []
    for mode, target in (("equal", 9), ("at_most", 5)):
        wait_idle(srv)
        _fresh(srv.url)
        r = srv.post("/generate", {"text": prompt, "sampling_params": {
            "temperature": 0, "max_new_tokens": 16, "length_target": target,
            "length_mode": mode, "return_length_values": True}})
        assert r.status_code == 200, r.text
        body = r.json()
        out.append((body["output_ids"], body["meta_info"]["lenvm_p"]))
    return out


def _same(a, b):
    for (ids_a, p_a), (ids_b, p_b) in zip(a, b):
        assert ids_a == ids_b
        assert p_a == pytest.approx(p_b, abs=1e-5)


@pytest.fixture(scope="module")
def dp_server(models, tmp_path_factory):
    s = Server(["--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
                "--dp-size", "2", "--chunked-prefill-size", "64"],
               tmp_path_factory.mktemp("logs") / "dp.log")
    yield s
    s.stop()


def test_data_parallel_ranks_each_serve_with_their_own_lenvm(dp_server, server):
    """Every prompt, on both DP ranks (SGLang's controller alternates them), gives the tokens
    and values of the one-scheduler server; /lenvm/stats reports both ranks, both did work,
    and both return to idle."""
    before = all_stats(dp_server)
    assert [s["dp_rank"] for s in before] == [0, 1]
    for prompt in PROMPTS:
        single = _guided(server, prompt)
        _same(_guided(dp_server, prompt), single)
        _same(_guided(dp_server, prompt), single)
    after = all_stats(dp_server)
    for b, a in zip(before, after):
        assert a["star_forwards"] > b["star_forwards"], (b, a)
        assert a["faults"] == b["faults"] == 0
    wait_idle(dp_server)
    info = dp_server.get("/server_info").json()
    lenvm = [s.get("lenvm") for s in info["internal_states"]]
    assert sorted(x["dp_rank"] for x in lenvm) == [0, 1]  # in the order the ranks answered


@pytest.fixture(scope="module")
def router(server, dp_server, tmp_path_factory):
    """SGLang's router (sglang-router, cache-aware policy) in front of two sglang-lenvm
    servers: the session's and the data-parallel one. --dp-aware: the router addresses each
    DP rank itself (SGLang's own DP controller balances by load, not by prefix, so a repeated
    prompt could land on the other rank's cache)."""
    import subprocess
    import sys
    import time

    import requests

    from sglang_lenvm.testing.server_process import free_port

    port = free_port()
    log = open(tmp_path_factory.mktemp("logs") / "router.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
         "--port", str(port), "--worker-urls", server.url, dp_server.url,
         "--policy", "cache_aware", "--dp-aware", "--prometheus-port", str(free_port())],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert proc.poll() is None, open(log.name).read()[-3000:]
        time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _post(url, path, body, headers=None):
    import requests

    r = requests.post(url + path, json=body, headers=headers or {}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


HEADER = {"X-Length-Control": '{"length_target": 9, "length_mode": "equal"}'}
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "Tell me about the sea."}],
             "temperature": 0, "max_tokens": 16}


def _fresh(*urls):
    """Empty the radix caches: a prompt computed from scratch everywhere. (A cached prefix
    gives float32 values a few 1e-6 off the fresh ones, and the tiny random models have
    near-ties that this can flip.) `?timeout=`: SGLang defers the flush until its scheduler is
    idle; a response can reach us before the scheduler has dropped the finished request from
    its batch, and a flush without a timeout then answers 400."""
    import requests

    for u in urls:
        assert requests.post(u + "/flush_cache?timeout=30", timeout=60).status_code == 200


def test_through_the_router_with_the_header(router, server, dp_server):
    """The router rebuilds chat and /generate bodies from its own schema and drops our
    fields; the X-Length-Control header passes: the same tokens as on a server directly."""
    workers = (server.url, dp_server.url)
    wait_idle(server), wait_idle(dp_server)
    _fresh(*workers)
    direct = _post(server.url, "/v1/chat/completions", CHAT_BODY, HEADER)["choices"][0]
    _fresh(*workers)
    routed = _post(router, "/v1/chat/completions", CHAT_BODY, HEADER)["choices"][0]
    assert routed.get("length_control", {}).get("length_target") == 9, routed
    assert routed["message"] == direct["message"]
    gen = {"text": "Name three birds.", "sampling_params": {"temperature": 0,
                                                             "max_new_tokens": 16}}
    _fresh(*workers)
    direct_ids = _post(server.url, "/generate", gen, HEADER)["output_ids"]
    _fresh(*workers)
    assert _post(router, "/generate", gen, HEADER)["output_ids"] == direct_ids
    # /v1/completions keeps unknown body fields: the fields work there in the body too.
    comp = {"model": "m", "prompt": "The sea is", "temperature": 0, "max_tokens": 16,
            "length_target": 5, "length_mode": "at_most"}
    out = _post(router, "/v1/completions", comp)
    assert out["usage"]["completion_tokens"] <= 5 and "length_control" in out["choices"][0]


def test_router_drops_body_fields_on_chat(router):
    """Pinned upstream behaviour (sglang-router 0.2.4 and 0.3.2), documented in the README:
    body fields on chat never reach the server through the router, so use the header."""
    out = _post(router, "/v1/chat/completions", {**CHAT_BODY, "length_target": 9})
    assert "length_control" not in out["choices"][0]


def test_router_keeps_prefix_hits(router):
    """Cache-aware routing sends a repeated prompt to the server that holds its prefix, and
    there the LenVM's mirror is reused too (cached tokens, no new mirrored prompt)."""
    short = {"X-Length-Control": '{"length_target": 2, "length_mode": "at_most"}'}
    for k in range(4):  # several prompts: the router spreads them over its workers
        text = f"Prefix {k}. " + " ".join(f"fact {i} is {i * 3 + k}." for i in range(40))
        gen = {"text": text, "sampling_params": {"max_new_tokens": 2}}
        first = _post(router, "/generate", gen, short)
        again = _post(router, "/generate", gen, short)
        assert again["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 1
