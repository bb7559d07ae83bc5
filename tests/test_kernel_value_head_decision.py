"""The fused value head + decision kernels vs the torch path (ValueHead math, force_stop_value,
the scorer's NaN handling, decide).

Runs on CPU in a TRITON_INTERPRET=1 child process (see tests/interpreter.py for why),
or compiled in-process when a CUDA device is present.
"""

import math

import pytest
import torch
from interpreter import DEVICE, needs_device, not_in_child, run_in_interpreter

GAMMA = 0.99
# On a GPU the fc GEMM runs in 3xTF32 (about float32 accuracy, not bit-equal to torch's SGEMM)
P_ATOL, Q_ATOL, Z_ATOL = (1e-5, 1e-4, 1e-4) if DEVICE == "cuda" else (2e-6, 1e-5, 2e-5)
NONE, EQUAL, AT_MOST, AT_LEAST = 0, 1, 2, 3


@not_in_child
def test_interpreter_subprocess():
    run_in_interpreter(__file__)


def test_mode_codes_match_the_schema():
    from sglang_lenvm import schema

    assert (schema.MODE_NONE, schema.MODE_EQUAL, schema.MODE_AT_MOST, schema.MODE_AT_LEAST) == (
        NONE, EQUAL, AT_MOST, AT_LEAST)


def _head(H, seed):
    g = torch.Generator().manual_seed(seed)
    # scaled so that z spreads over a few units: p from ~0.05 to ~0.95, lengths 5..300
    return (torch.randn(H, H, generator=g) / math.sqrt(H), torch.randn(H, generator=g) * 0.1,
            torch.randn(1, H, generator=g) * 3 / math.sqrt(H), torch.tensor([1.0]))


def reference_value_head_decision(hidden, fc_weight, fc_bias, summary_weight, summary_bias,
                                  *, ids, base_prob, valid, stop_ids, **kw):
    """The scorer's torch path: ValueHead math, sigmoid, then `decide_from_values`."""
    from sglang_lenvm.runtime.decision import Candidates, decide_from_values

    B, K = ids.shape
    fc = torch.nn.functional.linear(hidden.float(), fc_weight, fc_bias)
    z = torch.nn.functional.linear(torch.nn.functional.silu(fc), summary_weight.view(1, -1),
                                   summary_bias.view(-1)).squeeze(-1)
    p_all = torch.sigmoid(z).view(B, K + int(kw["has_root"]))
    closes = kw.pop("closes", None)
    return decide_from_values(p_all, Candidates(ids=ids, base_prob=base_prob, valid=valid,
                                                closes=closes), stop_ids, **kw)


def _run_both(hidden, head, codes=(EQUAL, AT_MOST, AT_LEAST), **kw):
    """The kernel (given the mode codes `codes`: the caller's mode tensor is re-coded into
    them) and the reference (the schema's codes)."""
    from sglang_lenvm.config import DEFAULT_EQUAL_DISTANCE
    from sglang_lenvm.kernels.value_head_decision import value_head_decision_triton

    dev = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
    equal_distance = kw.pop("equal_distance", DEFAULT_EQUAL_DISTANCE)
    recode = torch.tensor([NONE if NONE not in codes else max(codes) + 1, *codes])
    kernel_kw = {**kw, "mode": recode[kw["mode"]]}
    got = value_head_decision_triton(dev(hidden), *map(dev, head), mode_codes=codes,
                                     equal_ratio=equal_distance == "ratio",
                                     **{k: dev(v) for k, v in kernel_kw.items()})
    want = reference_value_head_decision(hidden, *head, equal_distance=equal_distance, **kw)
    return got, want


def _compare(got, want):
    assert torch.allclose(got.p_all.cpu(), want.p_all, atol=P_ATOL, equal_nan=True)
    assert torch.allclose(got.p_cand.cpu(), want.p_cand, atol=P_ATOL)
    assert torch.equal(got.cand_ok.cpu(), want.cand_ok)
    assert torch.allclose(got.q.cpu(), want.q, atol=Q_ATOL, equal_nan=True), (got.q, want.q)


def _lengths(p):
    from sglang_lenvm.returns import remaining_from_p

    return remaining_from_p(p.float(), GAMMA)


@needs_device
@pytest.mark.parametrize("dtype,equal_distance,codes", [
    (torch.bfloat16, "ratio", (EQUAL, AT_MOST, AT_LEAST)),
    (torch.float32, "ratio", (EQUAL, AT_MOST, AT_LEAST)),
    (torch.float32, "tokens", (EQUAL, AT_MOST, AT_LEAST)),
    (torch.float32, "ratio", (7, 0, 5)),  # the kernel reads the codes it is given
])
def test_every_mode_with_root(dtype, equal_distance, codes):
    torch.manual_seed(0)
    B, K, H = 9, 5, 80  # H not a multiple of the 32/64 blocks
    head = _head(H, 1)
    hidden = torch.randn(B * (K + 1), H).to(dtype)
    ids = torch.randint(20, 60, (B, K))
    ids[1, 2] = 7  # EOS among the candidates (a valid one)
    ids[3, 0] = 8  # the second stop id of row 3, in slot 0
    base = torch.softmax(torch.randn(B, K), -1).sort(-1, descending=True).values
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[0, 3:] = False  # fewer valid slots than K (mode none row)
    stop = torch.tensor([[7, 8, -1]] * B)
    stop[5] = -1  # a row without stop ids (ignore_eos)

    # Targets placed among the candidates' own predicted lengths, so that the admissible sets
    # are neither empty nor full; rows 6/7 have nothing admissible (the fallbacks).
    probe, _ = _run_both(hidden, head, ids=ids, base_prob=base, valid=valid, stop_ids=stop,
                         has_root=True, mode=torch.zeros(B, dtype=torch.int64),
                         target=torch.zeros(B, dtype=torch.int64),
                         generated=torch.zeros(B, dtype=torch.int64), beta=torch.zeros(B),
                         greedy=torch.zeros(B, dtype=torch.bool), gamma=GAMMA)
    med = _lengths(probe.p_cand.cpu()).median(1).values.round().long()
    generated = torch.full((B,), 3)
    target = med + generated + 1  # r = median length
    mode = torch.tensor([NONE, EQUAL, AT_MOST, AT_LEAST, AT_MOST, AT_LEAST, AT_MOST, AT_LEAST,
                         EQUAL])
    target[6] = generated[6]  # at_most with r = 0: only the stop candidate (p = 0) fits ...
    stop[6, 0] = -1  # ... and there is none among the candidates: fallback to the shortest
    target[7] = 100_000  # at_least far beyond every prediction: fallback to the longest
    beta = torch.tensor([0.0, 0.0, -4.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    greedy = torch.tensor([False, False, False, False, True, True, False, False, True])
    got, want = _run_both(hidden, head, ids=ids, base_prob=base, valid=valid, stop_ids=stop,
                          has_root=True, mode=mode, target=target, generated=generated,
                          beta=beta, greedy=greedy, gamma=GAMMA, equal_distance=equal_distance,
                          codes=codes)
    _compare(got, want)
    assert want.p_cand[1, 2] == 0 and want.p_cand[3, 0] == 0  # stops forced to 0
    assert ((want.q > 0) & (want.q < 1)).any(1)[[0, 2, 3]].all()  # sampling rows really sample
    assert (want.q.max(1).values == 1)[[1, 4, 5, 6, 7, 8]].all()  # the one-hot rows


@needs_device
def test_prefill_tree_single_candidate_and_nan_row():
    torch.manual_seed(1)
    B, K, H = 4, 1, 64
    head = _head(H, 2)
    hidden = torch.randn(B * K, H)
    hidden[2, 5] = float("nan")  # a broken LenVM state: the row must come back not ok
    ids = torch.randint(0, 50, (B, K))
    kw = dict(ids=ids, base_prob=torch.ones(B, K), valid=torch.ones(B, K, dtype=torch.bool),
              stop_ids=torch.full((B, 1), -1), has_root=False,
              mode=torch.tensor([EQUAL, AT_MOST, AT_LEAST, NONE]),
              target=torch.tensor([5, 5, 5, 0]), generated=torch.zeros(B, dtype=torch.int64),
              beta=torch.tensor([0.0, 1.0, 0.0, -1.0]), greedy=torch.zeros(B, dtype=torch.bool),
              gamma=GAMMA)
    got, want = _run_both(hidden, head, **kw)
    _compare(got, want)
    assert want.cand_ok.tolist() == [True, True, False, True]


@needs_device
def test_rows_without_valid_candidates_and_ties():
    # A non-steering row (nothing valid) gives NaN like torch.softmax does; an exact tie in
    # `equal` mode goes to the earlier (more likely) slot.
    torch.manual_seed(2)
    B, K, H = 2, 4, 32
    head = _head(H, 3)
    hidden = torch.randn(B * (K + 1), H)
    hidden[K + 1 + 1 + 2] = hidden[K + 1 + 1 + 1]  # row 1: candidates 1 and 2 share a state
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[0] = False
    probe, _ = _run_both(hidden, head, ids=torch.arange(B * K).view(B, K),
                         base_prob=torch.full((B, K), 0.25), valid=valid,
                         stop_ids=torch.full((B, 1), -1), has_root=True,
                         mode=torch.zeros(B, dtype=torch.int64),
                         target=torch.zeros(B, dtype=torch.int64),
                         generated=torch.zeros(B, dtype=torch.int64), beta=torch.zeros(B),
                         greedy=torch.zeros(B, dtype=torch.bool), gamma=GAMMA)
    r = int(_lengths(probe.p_cand.cpu())[1, 1].round())
    kw = dict(ids=torch.arange(B * K).view(B, K), base_prob=torch.full((B, K), 0.25),
              valid=valid, stop_ids=torch.full((B, 1), -1), has_root=True,
              mode=torch.tensor([NONE, EQUAL]), target=torch.tensor([0, r + 1]),
              generated=torch.zeros(B, dtype=torch.int64), beta=torch.zeros(B),
              greedy=torch.zeros(B, dtype=torch.bool), gamma=GAMMA)
    got, want = _run_both(hidden, head, **kw)
    _compare(got, want)
    assert torch.isnan(want.q[0]).all()
    if (probe.p_cand[1, 1] == probe.p_cand[1, 2]) and want.q[1, 1:3].sum() == 1:
        assert want.q[1, 1] == 1


@needs_device
def test_value_head_only_matches_reference_z():
    from sglang_lenvm.kernels.value_head_decision import value_head_triton

    torch.manual_seed(3)
    H = 96
    W, b, ws, bs = _head(H, 4)
    hidden = torch.randn(37, H, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(hidden.float(), W, b)), ws, bs
    ).squeeze(-1)
    got = value_head_triton(*(x.to(DEVICE) for x in (hidden, W, b, ws, bs)))
    assert got.shape == (37,) and torch.allclose(got.cpu(), want, atol=Z_ATOL)


@needs_device
def test_at_most_keeps_going_when_only_stop_fits():
    """Budget left (r = 1, row 0) and every continuation predicted longer: EOS and the shortest
    continuation share the sampling mass; at r = 0 (row 1) only EOS is left."""
    torch.manual_seed(3)
    B, K, H = 2, 4, 64
    head = _head(H, 3)
    hidden = torch.randn(K + 1, H).repeat(B, 1)  # both rows: the same tree, other budgets
    ids = torch.tensor([[30, 7, 31, 32], [30, 7, 31, 32]])
    base = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * B)
    kw = dict(ids=ids, base_prob=base, valid=torch.ones(B, K, dtype=torch.bool),
              stop_ids=torch.tensor([[7, -1]] * B), has_root=True,
              mode=torch.full((B,), AT_MOST), target=torch.tensor([5, 4]),
              generated=torch.tensor([3, 3]), beta=torch.zeros(B),
              greedy=torch.zeros(B, dtype=torch.bool), gamma=GAMMA)
    got, want = _run_both(hidden, head, **kw)
    _compare(got, want)
    lengths = _lengths(want.p_cand.cpu())
    assert (lengths[0, [0, 2, 3]] > 1.5).all()  # no continuation fits r = 1
    shortest = [0, 2, 3][int(lengths[0, [0, 2, 3]].argmin())]
    q = want.q.cpu()
    assert q[0, 1] > 0 and q[0, shortest] > 0 and q[0].sum().item() == pytest.approx(1)
    assert q[1].tolist() == [0, 1, 0, 0]


@needs_device
@pytest.mark.parametrize("plausibility,softness,pull,at_most_softness,ends,end_boost,under",
                         [(0.3, math.inf, 0.0, math.inf, False, 1.0, 1.0),
                          (0.0, 2.0, 0.5, 1.0, False, 1.0, 2.5),
                          (0.2, 8.0, 2.0, 4.0, False, 1.0, 1.0),
                          (0.0, 16.0, 1.0, 2.0, True, 1.0, 1.0),
                          (0.1, math.inf, 1.0, math.inf, True, 1.0, 0.5),
                          (0.1, 16.0, 1.0, 2.0, True, 30.0, 2.5)])
def test_plausibility_soft_equal_and_forced_stop(plausibility, softness, pull, at_most_softness,
                                                 ends, end_boost, under):
    """The quality-aware knobs: the plausibility floor in every mode, the soft equal and
    at_most rules, equal rows that must stop (past the overshoot limit) taking their most likely
    stop slot, at_least's pull toward ending past its target (row 7), sentence ends and the
    boost of an at_most row's stop token right after one (row 3, slot 5)."""
    torch.manual_seed(4)
    B, K, H = 8, 6, 48
    head = _head(H, 5)
    hidden = torch.randn(B * (K + 1), H)
    ids = torch.randint(20, 60, (B, K))
    ids[2, 4] = 7  # an unlikely stop candidate: exempt from the floor
    ids[6, 5] = 7  # a must-stop row with a stop slot ...
    ids[3, 5] = 7  # an at_most row's (appended) stop slot
    base = torch.softmax(torch.randn(B, K) * 2, -1).sort(-1, descending=True).values
    valid = torch.ones(B, K, dtype=torch.bool)
    stop = torch.tensor([[7, -1]] * B)
    mode = torch.tensor([EQUAL, EQUAL, EQUAL, AT_MOST, AT_LEAST, NONE, EQUAL, AT_LEAST])
    generated = torch.full((B,), 2)
    target = torch.tensor([30, 8, 3, 12, 40, 0, 3, 3])
    must = torch.tensor([False] * 6 + [True, False])
    beta = torch.tensor([0.0, 0.0, 0.0, -3.0, 2.0, 1.5, 0.0, 0.0])
    greedy = torch.tensor([False, True, False, False, False, False, False, False])
    kw = dict(ids=ids, base_prob=base, valid=valid, stop_ids=stop, has_root=True, mode=mode,
              target=target, generated=generated, beta=beta, greedy=greedy, gamma=GAMMA,
              plausibility=plausibility, equal_softness=softness, at_least_end_pull=pull,
              at_most_softness=at_most_softness, must_stop=must, equal_undershoot=under)
    if ends:  # sentence ends (Candidates.closes): a third of the slots, in every mode
        closes = torch.rand(B, K, generator=torch.Generator().manual_seed(6)) < 0.35
        closes[3, 5] = True  # row 3's output stands at a sentence end
        got, want = _run_both(hidden, head, closes=closes, at_most_end_boost=end_boost, **kw)
        _compare(got, want)
        plain, _ = _run_both(hidden, head, **kw)
        assert not torch.allclose(got.q.cpu(), plain.q.cpu(), atol=Q_ATOL)  # it is read
        if end_boost != 1:
            unboosted, _ = _run_both(hidden, head, closes=closes, **kw)
            assert want.q[3, 5] > unboosted.q[3, 5] + 0.05  # the stop token's boost is read
        return
    got, want = _run_both(hidden, head, **kw)
    _compare(got, want)
    q = want.q
    assert q[6].tolist() == [0, 0, 0, 0, 0, 1]  # forced to its stop slot
    floor = base < plausibility * base[:, :1]
    floor[:, 0] = False
    floor &= ids != 7  # stop tokens always compete
    assert (q[floor] == 0).all()  # implausible candidates never picked
    if not math.isinf(softness):
        assert ((q[0] > 0) & (q[0] < 1)).any()  # soft equal samples
        assert q[1].max() == 1  # greedy soft equal is deterministic
    if not math.isinf(at_most_softness) and (~floor[3]).sum() >= 2:
        # soft at_most samples among its plausible candidates (row 3, r = 9)
        assert ((q[3] > 0) & (q[3] < 1)).sum() >= 2
