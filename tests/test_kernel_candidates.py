"""The Triton candidate selection vs select_candidates (top-k / top-p / min-p truncation).

Runs on CPU in a TRITON_INTERPRET=1 child process (see tests/interpreter.py for why),
or compiled in-process when a CUDA device is present.
"""


import pytest
import torch
from interpreter import DEVICE, needs_device, not_in_child, run_in_interpreter


@not_in_child
def test_interpreter_subprocess():
    run_in_interpreter(__file__)


def _compare(logits, temp, top_k, top_p, min_p, k_max):
    from sglang_lenvm.kernels.candidates import select_candidates_triton
    from sglang_lenvm.runtime.decision import select_candidates

    dev = lambda x: x.to(DEVICE)  # noqa: E731
    got, lse = select_candidates_triton(dev(logits), dev(temp), dev(top_k), dev(top_p),
                                        dev(min_p), k_max, return_lse=True)
    want = select_candidates(logits, temp, top_k, top_p, min_p, k_max)
    assert got.ids.shape == want.ids.shape and got.ids.dtype == torch.int64
    assert torch.allclose(got.base_prob.cpu(), want.base_prob, rtol=1e-5, atol=1e-7)
    assert torch.equal(got.valid.cpu(), want.valid)
    has_mass = want.base_prob > 0  # zero-probability slots hold arbitrary ids in torch.topk
    assert torch.equal(got.ids.cpu()[has_mass], want.ids[has_mass])
    want_lse = torch.logsumexp(logits.float() / temp.view(-1, 1), -1)
    assert torch.allclose(lse.cpu(), want_lse, atol=1e-5)
    return got


def _settings(B):
    g = torch.Generator().manual_seed(B)
    temp = 0.5 + torch.rand(B, generator=g)
    top_k = torch.randint(1, 9, (B,), generator=g)
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.2, 1.0, 0.95, 0.7, 1.0])[:B]
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.3, 0.1, 0.0, 0.02])[:B]
    return temp, top_k, top_p, min_p


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_truncation_matches_reference(dtype):
    torch.manual_seed(0)
    B, V = 8, 1000
    # distinct values in every row: the order of equal logits is unspecified (in torch too)
    pool = (torch.randn(8 * V) * 3).to(dtype).unique()
    assert pool.numel() >= V
    logits = torch.stack([pool[torch.randperm(pool.numel())[:V]] for _ in range(B)])
    logits[1, 17] = 25.0  # a peaked row: top_p / min_p cut after one token
    _compare(logits, *_settings(B), k_max=8)


@needs_device
@pytest.mark.parametrize("chunking", ["one", "many"])
def test_vocab_chunks_and_grammar_masks(chunking, monkeypatch):
    from sglang_lenvm.kernels import candidates

    # "many": 40-ish chunks of 64 tokens, so the merge really merges
    monkeypatch.setattr(candidates, "MIN_CHUNK", 1 << 30 if chunking == "one" else 64)
    monkeypatch.setattr(candidates, "TARGET_PROGRAMS", 200)
    torch.manual_seed(1)
    B, V = 4, 2500
    logits = torch.randn(B, V) * 2
    logits[0, :] = float("-inf")
    logits[0, [3, 1900]] = torch.tensor([0.5, 1.5])  # only 2 finite tokens for 6 slots
    logits[2, 1000:1200] = float("-inf")  # a fully masked chunk
    _compare(logits, *_settings(B), k_max=6)


@needs_device
def test_k1_and_k_beyond_vocab():
    torch.manual_seed(2)
    logits = torch.randn(3, 10)
    temp, top_k, top_p, min_p = _settings(3)
    _compare(logits, temp, torch.ones(3, dtype=torch.int64), top_p, min_p, k_max=1)
    got = _compare(logits, temp, torch.full((3,), 16), torch.ones(3), torch.zeros(3), k_max=16)
    assert got.ids.shape == (3, 10) and got.valid.all()  # k = min(k_max, vocab)
