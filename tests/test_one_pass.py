"""One-pass scoring (--lenvm-scoring one-pass / auto): the LenVM runs over each request's state
only, and the checkpoint's candidate head scores the candidates from that state's hidden state
(value_head.CandidateHead). Checked against a plain transformers forward of the same checkpoint
and head, and with the oracle LenVM, whose candidate head reproduces its star-tree values
exactly, against the same exact decisions as the star path (test_server_guidance.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from pools import stats, wait_idle
from reference import candidate_p, trace_reference
from sglang_lenvm.testing.server_process import Server
from test_server_guidance import EOS, gen, gen_many


@pytest.fixture(scope="module")
def one_pass_server(models, tmp_path_factory):
    s = Server(["--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm_1p"),
                "--lenvm-scoring", "one-pass", "--chunked-prefill-size", "64"],
               tmp_path_factory.mktemp("logs") / "one_pass.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oracle_one_pass_server(models, tmp_path_factory):
    """As the star path's oracle_server (conftest), with --lenvm-scoring auto: the checkpoint
    has a candidate head, so auto takes one-pass."""
    s = Server(["--model-path", str(models / "cbase"), "--lenvm-path",
                str(models / "oracle_1p"), "--lenvm-top-k", "48", "--lenvm-plausibility", "0",
                "--lenvm-scoring", "auto"],
               tmp_path_factory.mktemp("logs") / "oracle_one_pass.log")
    yield s
    s.stop()


@pytest.mark.parametrize("mode,target", [("equal", 9), ("at_most", 5), ("at_least", 12)])
def test_values_match_transformers(one_pass_server, models, mode, target):
    """State values: the same trace as the star path (the LenVM over the real sequence). Chosen
    candidates' values: the candidate head on the state's hidden state and the token's
    embedding, as a transformers forward of the checkpoint computes them."""
    tok = AutoTokenizer.from_pretrained(str(models / "base"))
    before = stats(one_pass_server)
    text = "Tell me about the sea."
    out = gen(one_pass_server, text, max_new_tokens=16, temperature=0, length_target=target,
              length_mode=mode, return_length_values=True)
    prompt, ids = tok.encode(text), out["output_ids"]
    meta = out["meta_info"]
    ref = trace_reference(models / "lenvm_1p", prompt, ids)
    assert (torch.tensor(meta["lenvm_p"], dtype=torch.float64) - ref).abs().max() < 1e-4
    chosen = meta["lenvm_p_chosen"]
    checked = 0
    for t, c in enumerate(chosen):
        if c is None or ids[t] == tok.convert_tokens_to_ids("<|im_end|>"):  # a stop: p = 0
            continue
        want = candidate_p(models / "lenvm_1p", prompt + ids[:t], [ids[t]])[0].item()
        assert c == pytest.approx(want, abs=1e-4), t
        checked += 1
    assert checked >= len(ids) - 1
    after = stats(one_pass_server)
    assert after["scoring"] == "one-pass"
    # one LenVM token per decode row: trees are roots only
    assert after["star_tokens"] - before["star_tokens"] == after["star_rows"] - before["star_rows"]
    assert after["candidates_scored"] > before["candidates_scored"]
    wait_idle(one_pass_server)


@pytest.mark.parametrize("target", [2, 7, 20])
def test_oracle_equal_hits_the_target_exactly(oracle_one_pass_server, target):
    outs = [gen(oracle_one_pass_server, max_new_tokens=80, temperature=0.0,
                length_target=target)]
    outs += gen_many(oracle_one_pass_server, 3, max_new_tokens=80, temperature=1.0,
                     length_target=target)
    for out in outs:
        assert len(out["output_ids"]) == target and out["output_ids"][-1] == EOS
    assert stats(oracle_one_pass_server)["scoring"] == "one-pass"


@pytest.mark.parametrize("mode,target", [("at_most", 10), ("at_least", 10)])
def test_oracle_bounds_hold(oracle_one_pass_server, mode, target):
    for out in gen_many(oracle_one_pass_server, 6, max_new_tokens=60, temperature=1.0,
                        length_target=target, length_mode=mode):
        n = len(out["output_ids"])
        assert (n <= target and out["output_ids"][-1] == EOS) if mode == "at_most" else (
            n >= target and EOS not in out["output_ids"][:target - 1])


def test_one_pass_needs_a_candidate_head(models):
    from sglang_lenvm.launch_server import make_config

    with pytest.raises(ValueError, match="needs candidate_head.safetensors"):
        make_config(str(models / "lenvm"), None, scoring="one-pass")
    assert make_config(str(models / "lenvm"), None, scoring="auto").resolved_scoring(False) \
        == "star"


# ---- shared trunk: a LenVM whose first layer is the base model's own ----

@pytest.fixture(scope="module")
def trunk_server(models, tmp_path_factory):
    s = Server(["--model-path", str(models / "cbase"), "--lenvm-path", str(models / "trunk"),
                "--lenvm-scoring", "one-pass", "--chunked-prefill-size", "16"],
               tmp_path_factory.mktemp("logs") / "trunk.log")
    yield s
    s.stop()


def test_shared_trunk_layers_are_found(models):
    from sglang_lenvm.checkpoint import shared_trunk_layers

    assert shared_trunk_layers(str(models / "cbase"), str(models / "trunk")) == 1
    assert shared_trunk_layers(str(models / "base"), str(models / "lenvm")) == 0
    assert shared_trunk_layers(str(models / "cbase"), str(models / "oracle")) == 0


@pytest.mark.parametrize("mode,target", [("equal", 12), ("at_least", 20)])
def test_shared_trunk_values_match_transformers(trunk_server, models, mode, target):
    """The LenVM runs only its own layer, from the base model's residual stream: its state
    values (a long prompt: chunked prefill, then decode roots) and its chosen candidates'
    values equal a transformers forward of the whole LenVM checkpoint; it keeps KV for its own
    layer only."""
    tok = AutoTokenizer.from_pretrained(str(models / "cbase"))
    text = "thequickbrownfoxjumpsoverthelazydog" * 2
    out = gen(trunk_server, text, max_new_tokens=24, temperature=1.0, length_target=target,
              length_mode=mode, return_length_values=True)
    prompt, ids = tok.encode(text), out["output_ids"]
    meta = out["meta_info"]
    ref = trace_reference(models / "trunk", prompt, ids)
    assert (torch.tensor(meta["lenvm_p"], dtype=torch.float64) - ref).abs().max() < 1e-4
    for t, c in enumerate(meta["lenvm_p_chosen"]):
        if c is not None and ids[t] != EOS:
            want = candidate_p(models / "trunk", prompt + ids[:t], [ids[t]])[0].item()
            assert c == pytest.approx(want, abs=1e-4), t
    s = stats(trunk_server)
    assert s["trunk_layers"] == 1 and s["scoring"] == "one-pass"
    wait_idle(trunk_server)


def test_shared_trunk_unguided_and_values_only_rows(trunk_server, models):
    """A values-only request (no steering: roots only, from the trunk) beside an unguided
    one in the same batches; the unguided one gets exactly its tokens without a LenVM."""
    tok = AutoTokenizer.from_pretrained(str(models / "cbase"))
    plain = gen(trunk_server, "abcdef", max_new_tokens=16, temperature=0)
    outs = gen_many(trunk_server, 3, "abcdef", max_new_tokens=16, temperature=0,
                    return_length_values=True)
    for out in outs:
        assert out["output_ids"] == plain["output_ids"]
        ref = trace_reference(models / "trunk", tok.encode("abcdef"), out["output_ids"])
        got = torch.tensor(out["meta_info"]["lenvm_p"], dtype=torch.float64)
        assert (got - ref).abs().max() < 1e-4
    wait_idle(trunk_server)
