"""Fault injection: an exception in any LenVM phase costs one request its guidance, never the
server, never a batch-mate, and never a later request that shares its prefix.

The shared test server runs with SGLANG_LENVM_INJECT_FAULTS (every phase): a request whose
rid contains "lenvm-fault-<phase>" makes that phase raise whenever it runs over that request,
both in the batched call and in the row-by-row retry, as a request-specific bug would.
"""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from pools import stats, wait_idle
from reference import lenvm_p
from sglang_lenvm.runtime.faults import PHASES

PROMPTS = ["Tell me about the sea", "Tell me about ships and the", "A story of the moon"]


@pytest.fixture(scope="module")
def fault_server(server):
    return server


def sampling(i):
    """Batch-mates with different lengths, so that one finishes while the others run (filter)."""
    return {"max_new_tokens": 24, "temperature": 0, "length_target": 6 + 5 * i,
            "length_mode": "at_most", "return_length_values": True}


def generate_batch(server, rids):
    """The three prompts as one batch, joining a running unguided request (so that the batch
    is merged into a running one, and an unguided request shares its steps)."""
    background = f"bg-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(1) as ex:
        bg = ex.submit(server.post, "/generate", {
            "text": "Background", "rid": background,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}})
        deadline = time.time() + 30
        while stats(server)["running_requests"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        try:
            r = server.post("/generate", {"text": PROMPTS, "rid": rids,
                                          "sampling_params": [sampling(i) for i in range(3)]})
        finally:
            requests.post(server.url + "/abort_request", json={"rid": background}, timeout=30)
            bg.result()
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def reference_outputs(fault_server):
    """What the batch-mates produce when no request in their batch fails."""
    out = generate_batch(fault_server, [f"ref-{i}-{uuid.uuid4().hex}" for i in range(3)])
    return [o["output_ids"] for o in out]


# The faulty row alternates between rows 1 and 2 (both outlive row 0: a filter keeps them).
CASES = [(p, 1 + i % 2) for i, p in enumerate(p for p in PHASES if p != "admit")]


@pytest.mark.parametrize("phase,faulty", CASES, ids=[f"{p}-row{r}" for p, r in CASES])
def test_a_fault_costs_one_request_its_guidance(fault_server, reference_outputs, phase, faulty):
    wait_idle(fault_server)
    tag = uuid.uuid4().hex
    rids = [f"lenvm-fault-{phase}-{tag}" if i == faulty else f"ok-{i}-{tag}" for i in range(3)]
    out = generate_batch(fault_server, rids)
    for i, o in enumerate(out):
        meta = o["meta_info"]
        if i == faulty:
            reasons = [x for x in meta.get("lenvm_fault") or [] if x]
            assert len(reasons) == 1 and f"LenVM {phase}" in reasons[0] or (
                phase in ("star", "decision") and "LenVM scoring" in reasons[0]), meta
            # at_most's cap needs no LenVM: it holds for the unguided rest of the output
            assert len(o["output_ids"]) <= sampling(i)["length_target"]
        else:
            assert not meta.get("lenvm_fault"), meta
            assert o["output_ids"] == reference_outputs[i], (phase, i)
            assert len(meta["lenvm_p"]) == len(o["output_ids"])
    wait_idle(fault_server)
    assert fault_server.get("/health_generate").status_code == 200


def test_admission_fault_fails_that_request_only(fault_server, reference_outputs):
    tag = uuid.uuid4().hex

    def send(i):
        rid = f"lenvm-fault-admit-{tag}" if i == 1 else f"ok-{i}-{tag}"
        return fault_server.post("/generate", {"text": PROMPTS[i], "rid": rid,
                                               "sampling_params": sampling(i)})

    with ThreadPoolExecutor(3) as ex:
        responses = list(ex.map(send, range(3)))
    assert responses[1].status_code >= 400 and "admission" in responses[1].text
    for i in (0, 2):
        assert responses[i].status_code == 200, responses[i].text
        assert responses[i].json()["output_ids"] == reference_outputs[i]
    wait_idle(fault_server)


@pytest.mark.parametrize("phase", ["mirror", "star", "outputs"])
def test_a_faulty_requests_prefix_is_never_shared(fault_server, models, phase):
    """After a fault the request's LenVM KV has holes; a later request over the same tokens
    must get values equal to a fresh computation (transformers reference)."""
    ids = list(range(40, 80))
    r = fault_server.post("/generate", {
        "input_ids": ids, "rid": f"lenvm-fault-{phase}-{uuid.uuid4().hex}",
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True,
                            "length_target": 12, "length_mode": "at_least"}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert any(out["meta_info"].get("lenvm_fault") or [])
    again = ids + out["output_ids"] + [7, 8]
    r = fault_server.post("/generate", {"input_ids": again, "sampling_params": {
        "max_new_tokens": 1, "return_length_values": True}})
    assert r.status_code == 200, r.text
    got = r.json()["meta_info"]["lenvm_p"][0]
    ref = lenvm_p(models / "lenvm", again)[-1].item()
    assert got == pytest.approx(ref, abs=1e-4)
    wait_idle(fault_server)


def test_the_at_least_floor_holds_without_guidance(fault_server):
    """A request quarantined at its first step still gets at least its target."""
    r = fault_server.post("/generate", {
        "text": "Say", "rid": f"lenvm-fault-build-{uuid.uuid4().hex}",
        "sampling_params": {"max_new_tokens": 60, "length_target": 30,
                            "length_mode": "at_least"}})
    assert r.status_code == 200, r.text
    assert any(r.json()["meta_info"].get("lenvm_fault") or [])
    assert r.json()["meta_info"]["completion_tokens"] >= 30


def test_warning_in_openai_response(fault_server):
    r = requests.post(fault_server.url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
        "length_target": 8, "return_length_values": True,
        "rid": f"lenvm-fault-star-{uuid.uuid4().hex}"}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lc = choice["length_control"]
    assert "warning" in lc and "sampled without length guidance" in lc["warning"]
    assert len(lc["values"]) == r.json()["usage"]["completion_tokens"]
    wait_idle(fault_server)
    # the server still guides other requests
    ok = fault_server.post("/generate", {"text": "hi", "sampling_params": {
        "max_new_tokens": 20, "length_target": 5, "length_mode": "at_most"}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] <= 5
