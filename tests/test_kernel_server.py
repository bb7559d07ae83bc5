"""The GPU code path (Triton candidates, star attention, fused value head + decision) wired
into the real server, run on CPU under TRITON_INTERPRET=1: same values as transformers, same
choices as the torch path."""

import pytest
from transformers import AutoTokenizer

from reference import trace_reference
from sglang_lenvm.testing.server_process import Server

PROMPT = "The capital of France"


@pytest.fixture(scope="module")
def kernel_server(models, tmp_path_factory):
    from sglang_lenvm.runtime import sync_guard

    s = Server(["--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm")],
               tmp_path_factory.mktemp("logs") / "kernels.log",
               env={"TRITON_INTERPRET": "1", "SGLANG_LENVM_KERNELS": "triton",
                    sync_guard.ENV_VAR: "1"})
    yield s
    s.stop()


@pytest.mark.parametrize("guidance", [
    {"length_target": 5, "length_mode": "at_most"},
    {"length_target": 7, "length_mode": "equal"},
    {"length_target": 4, "length_mode": "equal"},  # may end at its limit, ceil(1.25 * 4) = 5
])
def test_triton_path_matches_reference_and_torch_path(kernel_server, server, models, guidance):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                "return_length_values": True, **guidance}}
    got = kernel_server.post("/generate", body, timeout=600).json()
    torch_path = server.post("/generate", body).json()
    tok = AutoTokenizer.from_pretrained(str(models / "base"))
    ref = trace_reference(models / "lenvm", tok.encode(PROMPT), got["output_ids"])
    vals = got["meta_info"]["lenvm_p"]
    assert max(abs(a - b) for a, b in zip(vals, ref.tolist())) < 1e-4
    assert got["output_ids"] == torch_path["output_ids"]
    if guidance["length_mode"] == "equal":
        assert len(got["output_ids"]) <= -(-5 * guidance["length_target"] // 4)


def test_triton_path_packs_trees_without_host_sync(kernel_server, models):
    """The GPU path packs each row's tree by its host-known top_k (no device sync): a top_k 6
    request does not widen a top_k 2 one's tree or give a values-only one candidates; the
    packed forward keeps the transformers values; no host sync in any step."""
    texts = ["Write a story", "Tell me a tale", "Values only, please"]
    guided = {"max_new_tokens": 4, "temperature": 1.0, "length_target": 4,
              "length_mode": "at_least", "return_length_values": True}
    params = [{**guided, "top_k": 6}, {**guided, "top_k": 2},
              {"max_new_tokens": 4, "ignore_eos": True, "return_length_values": True}]
    (before,) = kernel_server.get("/lenvm/stats").json()
    r = kernel_server.post("/generate", {"text": texts, "sampling_params": params}, timeout=600)
    assert r.status_code == 200, r.text
    (after,) = kernel_server.get("/lenvm/stats").json()
    # per request: prefill (candidates only) + 3 decode steps of root + candidates
    assert after["star_tokens"] - before["star_tokens"] == (6 + 3 * 7) + (2 + 3 * 3) + 3
    tok = AutoTokenizer.from_pretrained(str(models / "base"))
    for text, out in zip(texts, r.json()):
        ref = trace_reference(models / "lenvm", tok.encode(text), out["output_ids"])
        assert max(abs(a - b) for a, b in zip(out["meta_info"]["lenvm_p"], ref.tolist())) < 1e-4
    assert after["host_syncs"] == 0
