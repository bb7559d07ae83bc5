"""Scaling out on SGLang's own parallelism: data parallelism (--dp-size 2, one LenVM and one
mirror per scheduler) and SGLang's router in front of several servers."""

from __future__ import annotations

import threading
import time
import uuid

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


# ---- tensor parallelism: the LenVM sharded over the base model's TP group ----

@pytest.fixture(scope="module")
def tp_server(models, tmp_path_factory):
    """--tp-size 2 on this CPU (SGLang's groups on gloo), fault injection on as on the
    session server."""
    from sglang_lenvm.runtime.faults import ENV_VAR, PHASES

    s = Server(["--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
                "--tp-size", "2", "--chunked-prefill-size", "64"],
               tmp_path_factory.mktemp("logs") / "tp.log", env={ENV_VAR: ",".join(PHASES)})
    yield s
    s.stop()


def _ranks_in_step(srv):
    """Every TP rank of every scheduler: no token disagreement, the same LenVM work."""
    for s in all_stats(srv):
        ranks = s["tp_ranks"]
        assert [r["tp_rank"] for r in ranks] == list(range(s["tp_size"])), s
        assert all(r["tp_token_disagreements"] == 0 for r in ranks), ranks
        for key in ("star_forwards", "faults", "quarantined_requests"):
            assert len({r[key] for r in ranks}) == 1, (key, ranks)
    return all_stats(srv)[0]


def test_tensor_parallel_gives_the_single_rank_output(tp_server, server, models):
    """Greedy `equal` and `at_most` at tp 2: the tokens of tp 1, the values of tp 1 within
    fp32 rounding and of a plain transformers forward; the LenVM's KV is sharded (half the
    bytes per token on each rank)."""
    from transformers import AutoTokenizer

    from reference import trace_reference

    tok = AutoTokenizer.from_pretrained(str(models / "base"))
    for prompt in PROMPTS[:2]:
        single, sharded = _guided(server, prompt), _guided(tp_server, prompt)
        _same(sharded, single)
        for ids, p in sharded:
            ref = trace_reference(models / "lenvm", tok.encode(prompt), ids)
            assert max(abs(a - b) for a, b in zip(p, ref.tolist())) < 1e-4
    s = _ranks_in_step(tp_server)
    assert s["tp_size"] == 2 and s["star_forwards"] > 0
    assert 2 * s["kv_bytes_per_token"] == all_stats(server)[0]["kv_bytes_per_token"]
    wait_idle(tp_server)


def test_tensor_parallel_sampled_batch_keeps_ranks_in_step(tp_server):
    """Sampled requests of every kind in one batch (temperature 1: each rank draws its own
    random numbers): the ranks take the same tokens at every step, and the lengths hold."""
    from concurrent.futures import ThreadPoolExecutor

    wait_idle(tp_server)
    kinds = [{"length_target": 12, "length_mode": "equal"},
             {"length_target": 10, "length_mode": "at_least"},
             {"length_target": 6, "length_mode": "at_most"},
             {"beta": -2.0}, {}, {"length_target": 8, "n": 2}]
    bodies = [{"model": "m", "messages": [{"role": "user", "content": PROMPTS[i % 4]}],
               "max_tokens": 24, "temperature": 1.0, "return_length_values": True, **k}
              for i, k in enumerate(kinds)]
    with ThreadPoolExecutor(len(bodies)) as ex:
        outs = list(ex.map(lambda b: _post(tp_server.url, "/v1/chat/completions", b), bodies))
    assert outs[1]["usage"]["completion_tokens"] >= 10
    assert outs[2]["usage"]["completion_tokens"] <= 6
    assert all(len(c["length_control"]["values"]) > 0 for o in outs for c in o["choices"])
    _ranks_in_step(tp_server)
    wait_idle(tp_server)


@pytest.mark.parametrize("phase", ["mirror", "star", "outputs"])
def test_tensor_parallel_fault_costs_one_request_on_every_rank(tp_server, server, phase):
    """An injected LenVM fault at tp 2: the request is quarantined on both ranks and goes on
    unguided, its batch-mate gets the single-rank output, and both ranks come back to idle."""
    tag = uuid.uuid4().hex
    sp = [{"max_new_tokens": 16, "temperature": 0, "length_target": t,
           "length_mode": "at_most", "return_length_values": True} for t in (6, 11)]

    def batch(srv, rids):
        wait_idle(srv)
        _fresh(srv.url)
        return _post(srv.url, "/generate", {"text": PROMPTS[:2], "rid": rids,
                                            "sampling_params": sp})

    reference = batch(server, [f"ok-a-{tag}", f"ok-b-{tag}"])
    before = all_stats(tp_server)[0]["quarantined_requests"]
    out = batch(tp_server, [f"lenvm-fault-{phase}-{tag}", f"ok-c-{tag}"])
    assert any(out[0]["meta_info"].get("lenvm_fault") or [])
    assert len(out[0]["output_ids"]) <= 6  # the at_most cap needs no LenVM
    assert not out[1]["meta_info"].get("lenvm_fault")
    assert out[1]["output_ids"] == reference[1]["output_ids"]
    s = _ranks_in_step(tp_server)
    assert s["quarantined_requests"] == before + 1
    wait_idle(tp_server)


def test_tensor_parallel_aborts_and_disconnects_free_every_rank(tp_server):
    import requests

    wait_idle(tp_server)
    for _ in range(2):  # hang up mid-stream
        with requests.post(tp_server.url + "/v1/chat/completions", stream=True, timeout=60,
                           json={**CHAT_BODY, "max_tokens": 300, "temperature": 1.0,
                                 "length_target": 250, "length_mode": "at_least",
                                 "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break
    rids = [f"abort-{uuid.uuid4().hex}" for _ in range(4)]
    threads = [threading.Thread(target=requests.post, args=(tp_server.url + "/generate",),
                                kwargs={"timeout": 120, "json": {
                                    "text": "word " * (200 * (i % 2)) + "Tell a story",
                                    "rid": rid, "sampling_params": {
                                        "max_new_tokens": 300, "length_target": 250,
                                        "length_mode": "at_least"}}})
               for i, rid in enumerate(rids)]
    for t in threads:
        t.start()
    for i, rid in enumerate(rids):  # staggered: queued, prefilling, decoding
        time.sleep(0.1 * i)
        requests.post(tp_server.url + "/abort_request", json={"rid": rid}, timeout=30)
    for t in threads:
        t.join(timeout=120)
    wait_idle(tp_server)
    _ranks_in_step(tp_server)
    out = _post(tp_server.url, "/generate", {"text": "hi", "sampling_params": {
        "max_new_tokens": 20, "length_target": 5, "length_mode": "at_most"}})
    assert out["meta_info"]["completion_tokens"] <= 5


def test_tensor_parallel_one_pass_with_a_shared_trunk(models, tmp_path_factory):
    """One-pass scoring and the shared trunk at tp 2: the state values and the chosen
    candidates' values of a transformers forward of the whole checkpoint, ranks in step."""
    import torch
    from transformers import AutoTokenizer

    from reference import candidate_p, trace_reference

    tok = AutoTokenizer.from_pretrained(str(models / "cbase"))
    srv = Server(["--model-path", str(models / "cbase"), "--lenvm-path", str(models / "trunk"),
                  "--lenvm-scoring", "one-pass", "--tp-size", "2"],
                 tmp_path_factory.mktemp("logs") / "tp_trunk.log")
    try:
        text = "thequickbrownfoxjumps"
        out = _post(srv.url, "/generate", {"text": text, "sampling_params": {
            "max_new_tokens": 16, "temperature": 1.0, "length_target": 12,
            "length_mode": "at_least", "return_length_values": True}})
        ids, meta = out["output_ids"], out["meta_info"]
        prompt = tok.encode(text)
        ref = trace_reference(models / "trunk", prompt, ids)
        assert (torch.tensor(meta["lenvm_p"], dtype=torch.float64) - ref).abs().max() < 1e-4
        from test_server_guidance import EOS  # a stop token's value is 0 by definition

        chosen = [(t, c) for t, c in enumerate(meta["lenvm_p_chosen"])
                  if c is not None and ids[t] != EOS]
        assert len(chosen) >= 11
        for t, c in chosen:
            want = candidate_p(models / "trunk", prompt + ids[:t], [ids[t]])[0].item()
            assert c == pytest.approx(want, abs=1e-4), t
        s = _ranks_in_step(srv)
        assert s["trunk_layers"] == 1 and s["tp_size"] == 2
        wait_idle(srv)
    finally:
        srv.stop()
