"""The length decision rules on hand-made candidate sets."""

import math

import pytest
import torch

from sglang_lenvm.runtime.decision import (
    Candidates,
    decide,
    distribution_to_logits,
    force_stop_value,
    mask_stop_tokens,
    select_candidates,
)
from sglang_lenvm.schema import MODE_AT_LEAST, MODE_AT_MOST, MODE_EQUAL, MODE_NONE

G = 0.9


def p_of(lengths):
    """Values that predict exactly these remaining lengths."""
    return torch.tensor([[1 - G ** n for n in row] for row in lengths], dtype=torch.float32)


def cand(base, valid=None):
    base = torch.tensor(base, dtype=torch.float32)
    ids = torch.arange(base.shape[1]).expand_as(base) + 10
    v = torch.ones_like(base, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return Candidates(ids=ids, base_prob=base, valid=v)


def run(c, p, mode, target, generated, beta=0.0, greedy=False, equal_distance="ratio"):
    n = p.shape[0]
    return decide(c, p, mode=torch.full((n,), mode), target=torch.full((n,), target),
                  generated=torch.full((n,), generated), beta=torch.full((n,), float(beta)),
                  greedy=torch.full((n,), greedy), gamma=G, equal_distance=equal_distance)


@pytest.mark.parametrize("distance", ["ratio", "tokens"])
def test_equal_picks_closest_length(distance):
    c = cand([[0.4, 0.3, 0.2, 0.1]])
    # target 10, 3 generated: budget after this token r = 6
    q = run(c, p_of([[2, 5, 7, 6]]), MODE_EQUAL, 10, 3, equal_distance=distance)
    assert q.tolist() == [[0, 0, 0, 1]]
    q = run(c, p_of([[9, 5, 7, 3]]), MODE_EQUAL, 10, 12, equal_distance=distance)
    assert q.tolist() == [[0, 0, 0, 1]]  # over budget: r = 0, shortest wins


def test_equal_tokens_ties_go_to_the_more_likely_candidate():
    c = cand([[0.4, 0.3, 0.2, 0.1]])
    q = run(c, p_of([[9, 5, 7, 3]]), MODE_EQUAL, 10, 3, equal_distance="tokens")
    assert q.tolist() == [[0, 1, 0, 0]]  # r = 6: 5 and 7 tie at distance 1
    q = run(c, p_of([[9, 7, 5, 3]]), MODE_EQUAL, 10, 3, equal_distance="tokens")
    assert q.tolist() == [[0, 1, 0, 0]]


def test_equal_ratio_compares_one_plus_lengths():
    c = cand([[0.4, 0.3, 0.2, 0.1]])
    # r = 6: lengths 5 and 7 are both 1 token away, but 8/7 < 7/6, so 7 wins in ratio
    q = run(c, p_of([[9, 5, 7, 3]]), MODE_EQUAL, 10, 3)
    assert q.tolist() == [[0, 0, 1, 0]]
    # r = 5: 2 is 3 tokens short and 9 is 4 tokens long, but 6/3 = 2 > 10/6: 9 wins in
    # ratio, 2 in tokens
    p = p_of([[30, 2, 9, 40]])
    assert run(c, p, MODE_EQUAL, 10, 4).tolist() == [[0, 0, 1, 0]]
    assert run(c, p, MODE_EQUAL, 10, 4, equal_distance="tokens").tolist() == [[0, 1, 0, 0]]


def test_equal_ratio_does_not_stop_early_on_an_over_predicting_lenvm():
    """r = 25 with EOS (0) and a continuation predicted at 60: in tokens EOS is closer
    (25 < 35) and the output would end 25 tokens short; in ratio the continuation is
    (61/26 < 26/1). Near the end (r = 2) both stop."""
    c = cand([[0.5, 0.3, 0.2]])
    p = p_of([[0, 60, 90]])
    assert run(c, p, MODE_EQUAL, 40, 14, equal_distance="tokens").tolist() == [[1, 0, 0]]
    assert run(c, p, MODE_EQUAL, 40, 14).tolist() == [[0, 1, 0]]
    assert run(c, p, MODE_EQUAL, 40, 37).tolist() == [[1, 0, 0]]
    assert run(c, p, MODE_EQUAL, 40, 37, equal_distance="tokens").tolist() == [[1, 0, 0]]


def test_equal_distance_must_be_known():
    with pytest.raises(ValueError, match="equal_distance"):
        run(cand([[1.0]]), p_of([[3]]), MODE_EQUAL, 10, 0, equal_distance="log")


def test_equal_ignores_invalid_slots():
    c = cand([[0.4, 0.3, 0.2, 0.1]], valid=[[True, True, False, False]])
    q = run(c, p_of([[9, 8, 6, 6]]), MODE_EQUAL, 10, 3)
    assert q.tolist() == [[0, 1, 0, 0]]


def test_at_most_restricts_and_renormalizes():
    c = cand([[0.4, 0.3, 0.2, 0.1]])
    q = run(c, p_of([[9, 5, 7, 3]]), MODE_AT_MOST, 10, 3)  # r = 6: slots 1 and 3 fit
    assert torch.allclose(q, torch.tensor([[0, 0.75, 0, 0.25]]))
    q = run(c, p_of([[9, 8, 7, 12]]), MODE_AT_MOST, 10, 3)  # nothing fits: shortest
    assert q.tolist() == [[0, 0, 1, 0]]


def test_at_least_restricts_and_falls_back_to_longest():
    c = cand([[0.4, 0.3, 0.2, 0.1]])
    q = run(c, p_of([[9, 5, 7, 3]]), MODE_AT_LEAST, 10, 3)  # r = 6: slots 0, 2
    assert torch.allclose(q, torch.tensor([[4 / 6, 0, 2 / 6, 0]]))
    q = run(c, p_of([[1, 2, 3, 4]]), MODE_AT_LEAST, 10, 3)
    assert q.tolist() == [[0, 0, 0, 1]]


def test_beta_tilt_formula():
    base = [[0.5, 0.3, 0.2]]
    c = cand(base)
    p = torch.tensor([[0.9, 0.1, 0.5]])
    beta = -3.0
    q = run(c, p, MODE_NONE, 0, 0, beta=beta)
    w = torch.tensor(base[0]) * torch.exp(beta * p[0])
    assert torch.allclose(q[0], w / w.sum(), atol=1e-6)
    assert q[0, 1] > 0.3  # short candidate gains mass with beta < 0
    q0 = run(c, p, MODE_NONE, 0, 0, beta=0.0)
    assert torch.allclose(q0, torch.tensor(base), atol=1e-6)


def test_beta_inside_at_most_and_greedy():
    c = cand([[0.4, 0.3, 0.2, 0.1]])
    p = p_of([[9, 5, 7, 3]])
    q = run(c, p, MODE_AT_MOST, 10, 3, beta=-50.0)
    assert q[0, 0] == 0 and q[0, 2] == 0 and q[0, 3] > q[0, 1]
    q = run(c, p, MODE_AT_MOST, 10, 3, greedy=True)  # greedy: argmax inside the admissible set
    assert q.tolist() == [[0, 1, 0, 0]]


def test_stop_tokens_have_zero_value_and_can_be_masked():
    ids = torch.tensor([[5, 7, 2]])
    p = torch.tensor([[0.5, 0.5, 0.5]])
    stops = torch.tensor([[2, -1]])
    assert force_stop_value(p, ids, stops).tolist() == [[0.5, 0.5, 0.0]]
    logits = torch.zeros(1, 8)
    mask_stop_tokens(logits, stops, torch.tensor([True]))
    assert logits[0, 2] == float("-inf") and torch.isfinite(logits[0, :2]).all()
    only_eos = torch.full((1, 8), float("-inf"))
    only_eos[0, 2] = 0.0
    mask_stop_tokens(only_eos, stops, torch.tensor([True]))  # ending is the only way: kept
    assert only_eos[0, 2] == 0.0


def test_select_candidates_truncation():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    one = torch.ones(1)
    c = select_candidates(logits, one, torch.tensor([4]), one, torch.zeros(1), 5)
    assert c.ids.tolist() == [[0, 1, 2, 3, 4]] and c.valid.tolist() == [[True] * 4 + [False]]
    c = select_candidates(logits, one, torch.tensor([5]), torch.tensor([0.8]), torch.zeros(1), 5)
    assert c.valid.tolist() == [[True, True, True, False, False]]  # mass before < 0.8
    c = select_candidates(logits, one, torch.tensor([5]), one, torch.tensor([0.3]), 5)
    assert c.valid.tolist() == [[True, True, True, False, False]]  # p >= 0.3 * 0.5
    masked = logits.clone()
    masked[0, 1] = float("-inf")
    c = select_candidates(masked, one, torch.tensor([5]), one, torch.zeros(1), 5)
    assert 1 not in c.ids[0][c.valid[0]].tolist()


def test_distribution_to_logits_reproduces_q_after_temperature():
    q = torch.tensor([[0.6, 0.4, 0.0]])
    ids = torch.tensor([[3, 1, 0]])
    t = torch.tensor([0.7])
    logits = distribution_to_logits(q, ids, 6, t)
    probs = torch.softmax(logits / 0.7, dim=-1)
    assert torch.allclose(probs, torch.tensor([[0, 0.4, 0, 0.6, 0, 0]]), atol=1e-6)
    dup = distribution_to_logits(torch.tensor([[0.5, 0.5]]), torch.tensor([[2, 2]]), 4, torch.ones(1))
    assert math.isclose(torch.softmax(dup, -1)[0, 2].item(), 1.0, rel_tol=1e-6)


def test_at_most_does_not_end_at_once_when_only_stop_fits():
    """Slot 1 is EOS (p = 0, length 0). With budget left and every continuation predicted too
    long, EOS keeps its base probability but the shortest continuation is admissible too;
    at the last token (r = 0) only EOS remains."""
    c = cand([[0.5, 0.1, 0.3, 0.1]])
    is_stop = torch.tensor([[False, True, False, False]])
    p = p_of([[30, 0, 20, 40]])

    def at_most(generated):
        return decide(c, p, mode=torch.tensor([MODE_AT_MOST]), target=torch.tensor([16]),
                      generated=torch.tensor([generated]), beta=torch.zeros(1),
                      greedy=torch.tensor([False]), gamma=G, is_stop=is_stop)

    assert torch.allclose(at_most(0), torch.tensor([[0, 0.25, 0.75, 0]]))  # r = 15
    assert at_most(15).tolist() == [[0, 1, 0, 0]]  # r = 0
    # Without the stop mask (the old rule) the output would end here.
    assert run(c, p, MODE_AT_MOST, 16, 0).tolist() == [[0, 1, 0, 0]]


def test_stop_mask_holds_for_a_stop_id_of_zero():
    """-1 padding must not write token 0's own logit back over its -inf (stop id 0)."""
    for _ in range(20):  # scatter order is unspecified: repeat
        logits = torch.randn(3, 50)
        stop_ids = torch.tensor([[0, -1, -1, -1], [-1, -1, -1, 0], [0, 7, -1, -1]])
        mask_stop_tokens(logits, stop_ids, torch.tensor([True, True, False]))
        assert math.isinf(logits[0, 0]) and math.isinf(logits[1, 0])
        assert math.isfinite(logits[2, 0]) and math.isfinite(logits[2, 7])


def test_forced_stop_candidate_is_the_rows_most_likely_stop_token():
    from sglang_lenvm.runtime.scorer import _with_stop_candidate

    probs = torch.zeros(2, 20)
    probs[0, 3], probs[0, 5] = 0.01, 0.2  # row 0: stop ids 3 and 5, 5 is more likely
    probs[1, 3], probs[1, 5] = 0.3, 0.0  # row 1: 3 is more likely, 5 is banned
    c = cand([[0.5, 0.2], [0.5, 0.2]])
    stop_ids = torch.tensor([[3, 5], [3, 5]])
    out = _with_stop_candidate(c, lambda ids: probs.gather(1, ids), stop_ids,
                               torch.tensor([True, True]))
    assert out.ids[:, -1].tolist() == [5, 3]
    assert out.base_prob[:, -1].tolist() == pytest.approx([0.2, 0.3])
    assert out.valid[:, -1].tolist() == [True, True]
    # every stop token banned (probability 0): the slot is not valid, nothing is forced
    none = _with_stop_candidate(c, lambda ids: torch.zeros(ids.shape), stop_ids,
                                torch.tensor([True, True]))
    assert none.valid[:, -1].tolist() == [False, False]


def test_plausibility_floor_keeps_unlikely_tokens_out_of_the_length_race():
    """equal, r = 4: slot 3 predicts exactly 4 but has 2% of the mass; with a floor of 0.1 x
    the most likely it cannot win, and the closest plausible candidate does."""
    c = cand([[0.6, 0.3, 0.08, 0.02]])
    p = p_of([[40, 9, 20, 4]])
    assert run(c, p, MODE_EQUAL, 5, 0).tolist() == [[0, 0, 0, 1]]
    q = decide(c, p, mode=torch.tensor([MODE_EQUAL]), target=torch.tensor([5]),
               generated=torch.tensor([0]), beta=torch.zeros(1), greedy=torch.tensor([False]),
               gamma=G, plausibility=0.1)
    assert q.tolist() == [[0, 1, 0, 0]]
    # at_most: nothing plausible fits r = 4 -> the shortest plausible, not the rare one
    q = decide(c, p, mode=torch.tensor([MODE_AT_MOST]), target=torch.tensor([5]),
               generated=torch.tensor([0]), beta=torch.zeros(1), greedy=torch.tensor([False]),
               gamma=G, plausibility=0.1)
    assert q.tolist() == [[0, 1, 0, 0]]


def test_soft_equal_weighs_base_probability_by_length_distance():
    c = cand([[0.5, 0.3, 0.2]])
    lengths = [[30, 8, 3]]
    p = p_of(lengths)
    lam = 2.0
    q = decide(c, p, mode=torch.tensor([MODE_EQUAL]), target=torch.tensor([9]),
               generated=torch.tensor([0]), beta=torch.zeros(1), greedy=torch.tensor([False]),
               gamma=G, equal_softness=lam)
    r = 8
    d = torch.tensor([abs(math.log1p(n) - math.log1p(r)) for n in lengths[0]])
    want = torch.tensor([0.5, 0.3, 0.2]) * torch.exp(-lam * d)
    assert torch.allclose(q[0], want / want.sum(), atol=1e-4)
    greedy = decide(c, p, mode=torch.tensor([MODE_EQUAL]), target=torch.tensor([9]),
                    generated=torch.tensor([0]), beta=torch.zeros(1),
                    greedy=torch.tensor([True]), gamma=G, equal_softness=lam)
    assert greedy.tolist() == [torch.nn.functional.one_hot(want.argmax(), 3).tolist()]


def test_must_stop_takes_the_most_likely_stop_slot():
    c = cand([[0.5, 0.2, 0.2, 0.1]])
    is_stop = torch.tensor([[False, True, False, True]])
    p = p_of([[30, 0, 20, 0]])
    kw = dict(mode=torch.tensor([MODE_EQUAL]), target=torch.tensor([10]),
              generated=torch.tensor([20]), beta=torch.zeros(1), greedy=torch.tensor([False]),
              gamma=G, is_stop=is_stop, equal_softness=0.5)
    free = decide(c, p, **kw)
    assert 0 < free[0, 0] < 1  # soft equal past the target still samples continuations
    forced = decide(c, p, must_stop=torch.tensor([True]), **kw)
    assert forced.tolist() == [[0, 1, 0, 0]]


def test_at_least_pulls_toward_ending_past_its_target():
    c = cand([[0.6, 0.3, 0.1]])
    is_stop = torch.tensor([[False, False, True]])
    lengths = [[40, 5, 0]]
    p = p_of(lengths)
    kw = dict(mode=torch.tensor([MODE_AT_LEAST]), target=torch.tensor([10]), beta=torch.zeros(1),
              greedy=torch.tensor([False]), gamma=G, is_stop=is_stop, at_least_end_pull=1.0)
    before = decide(c, p, generated=torch.tensor([3]), **kw)  # r = 6: only slot 0 fits
    assert before.tolist() == [[1, 0, 0]]
    after = decide(c, p, generated=torch.tensor([9]), **kw)  # the 10th token: free to end
    want = torch.tensor([0.6 / 41, 0.3 / 6, 0.1 / 1])
    assert torch.allclose(after[0], want / want.sum(), atol=1e-4)
    free = decide(c, p, generated=torch.tensor([9]), **{**kw, "at_least_end_pull": 0.0})
    assert torch.allclose(free[0], torch.tensor([0.6, 0.3, 0.1]), atol=1e-6)


def test_soft_at_most_weighs_base_probability_by_how_far_past_the_budget():
    """While budget is left, q(x) ~ base(x) exp(-lam max(0, ln(1 + l) - ln(1 + r))) over the
    plausible candidates: what fits keeps its base weight, the stop token (l = 0) too; at the
    last token (r = 0) the hard rule holds: only the stop token."""
    c = cand([[0.5, 0.3, 0.15, 0.05]])
    is_stop = torch.tensor([[False, False, False, True]])
    lengths = [[40, 3, 9, 0]]
    p = p_of(lengths)
    lam = 1.5
    kw = dict(mode=torch.tensor([MODE_AT_MOST]), target=torch.tensor([10]), beta=torch.zeros(1),
              greedy=torch.tensor([False]), gamma=G, is_stop=is_stop, at_most_softness=lam)
    q = decide(c, p, generated=torch.tensor([5]), **kw)  # r = 4
    r = 4
    over = torch.tensor([max(0.0, math.log1p(n) - math.log1p(r)) for n in lengths[0]])
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]) * torch.exp(-lam * over)
    assert torch.allclose(q[0], want / want.sum(), atol=1e-5)
    assert over[1] == 0 and over[3] == 0  # l = 3 fits r = 4; the stop token always fits
    last = decide(c, p, generated=torch.tensor([9]), **kw)  # r = 0: only the stop token
    assert last.tolist() == [[0, 0, 0, 1]]
    # the plausibility floor still holds; beta tilts inside the soft rule
    floored = decide(c, p, generated=torch.tensor([5]), plausibility=0.7, **kw)
    assert floored[0, 1].item() == 0 and floored[0, 2].item() == 0 and floored[0, 3] > 0
    tilted = decide(c, p, generated=torch.tensor([5]), **{**kw, "beta": torch.tensor([-2.0])})
    want_t = want * torch.exp(-2.0 * p[0])
    assert torch.allclose(tilted[0], want_t / want_t.sum(), atol=1e-5)
    # lam = inf is the hard rule exactly
    hard = decide(c, p, generated=torch.tensor([5]), **{**kw, "at_most_softness": math.inf})
    assert torch.allclose(hard, decide(c, p, generated=torch.tensor([5]),
                                       **{k: v for k, v in kw.items()
                                          if k != "at_most_softness"}))
    greedy = decide(c, p, generated=torch.tensor([5]), **{**kw, "greedy": torch.tensor([True])})
    assert greedy.tolist() == [torch.nn.functional.one_hot(want.argmax(), 4).tolist()]


def test_a_sentence_end_counts_as_one_token_from_the_end():
    """`Candidates.closes`: in equal and at_most rows a candidate that ends a sentence counts
    as l = min(l, 1) (the output may stop right after it); at_least keeps the LenVM's l."""
    lengths = [[30, 30, 12]]  # slot 1 ends a sentence; the LenVM thinks the text goes on
    p = p_of(lengths)
    closes = torch.tensor([[False, True, False]])
    base = [[0.5, 0.3, 0.2]]
    lam = 4.0
    kw = dict(beta=torch.zeros(1), greedy=torch.tensor([False]), gamma=G, equal_softness=lam)

    def q_of(mode, target, generated, ends, **more):
        c = Candidates(**{**cand(base).__dict__, "closes": ends})
        return decide(c, p, mode=torch.tensor([mode]), target=torch.tensor([target]),
                      generated=torch.tensor([generated]), **kw, **more)

    # equal, r = 1: soft weights over d = |ln(1 + l) - ln 2| with l(slot 1) = 1
    r = 1
    for ends, l1 in ((closes, 1), (None, 30)):
        d = torch.tensor([abs(math.log1p(n) - math.log1p(r)) for n in (30, l1, 12)])
        want = torch.tensor(base[0]) * torch.exp(-lam * d)
        assert torch.allclose(q_of(MODE_EQUAL, 10, 8, ends)[0], want / want.sum(), atol=1e-5)
    assert q_of(MODE_EQUAL, 10, 8, closes)[0].argmax() == 1
    # Far from the end the sentence end changes nothing (the LenVM's l is the closer one).
    assert torch.allclose(q_of(MODE_EQUAL, 40, 9, closes), q_of(MODE_EQUAL, 40, 9, None))
    # at_most, hard rule, r = 2: only the sentence end fits (l = 30 and 12 run past).
    hard = q_of(MODE_AT_MOST, 10, 7, closes)
    assert hard.tolist() == [[0, 1, 0]]
    # at_least, r = 20: a sentence end is not the end before the target.
    assert torch.equal(q_of(MODE_AT_LEAST, 30, 9, closes), q_of(MODE_AT_LEAST, 30, 9, None))


@pytest.mark.parametrize("rule", [
    dict(plausibility=0.1, equal_softness=16.0, at_least_end_pull=1.0, at_most_softness=2.0),
    dict(plausibility=0.1),
    dict(plausibility=0.3, equal_distance="tokens"),
])
def test_slots_under_the_plausibility_floor_are_never_read(rule):
    """The scorer drops the slots outside plausible_slots before the LenVM forward. That is
    exact only if decide() never reads their values: on random rows of every mode (stop
    tokens below the floor, sentence ends, must_stop, greedy rows), making those slots
    invalid and giving them other values leaves q unchanged."""
    from sglang_lenvm.runtime.decision import plausible_slots, stop_mask

    gen = torch.Generator().manual_seed(0)
    B, K = 256, 9
    base = torch.rand(B, K, generator=gen) ** 3
    base = (base / base.sum(1, keepdim=True)).sort(1, descending=True).values
    count = torch.randint(1, K + 1, (B,), generator=gen)
    valid = torch.arange(K).view(1, K) < count.view(B, 1)
    ids = torch.randperm(50, generator=gen)[:K].expand(B, K).clone()
    stop_ids = torch.tensor([[int(ids[0, K - 1]), -1]]).expand(B, 2)  # the least likely slot
    closes = torch.rand(B, K, generator=gen) < 0.2
    c = Candidates(ids=ids, base_prob=base, valid=valid, closes=closes)
    is_stop = stop_mask(ids, stop_ids)
    p = torch.where(is_stop, 0.0, torch.rand(B, K, generator=gen))
    kw = dict(mode=torch.tensor([MODE_NONE, MODE_EQUAL, MODE_AT_MOST, MODE_AT_LEAST] * (B // 4)),
              target=torch.randint(1, 200, (B,), generator=gen),
              generated=torch.randint(0, 200, (B,), generator=gen),
              beta=torch.randn(B, generator=gen), greedy=torch.rand(B, generator=gen) < 0.2,
              gamma=0.997, is_stop=is_stop, must_stop=torch.rand(B, generator=gen) < 0.1)
    keep = plausible_slots(c, is_stop, rule["plausibility"])
    assert (keep.sum(1) < valid.sum(1)).any() and (keep & is_stop & ~(base >= 0.1 * base[:, :1])).any()
    pruned = Candidates(ids=ids, base_prob=base, valid=keep, closes=closes)
    garbage = torch.where(keep, p, torch.rand(B, K, generator=gen))
    assert torch.equal(decide(c, p, **kw, **rule), decide(pruned, garbage, **kw, **rule))


def test_select_candidates_returns_the_row_log_sum_exp():
    """return_lse: any token's probability is exp(logit / T - lse), the scorer's lookup of a
    stop token that truncation dropped; the candidates are those of the plain call."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=g) * 3
    logits[1, 7] = float("-inf")
    temp, ones = torch.tensor([0.5, 1.0, 1.5, 2.0]), torch.ones(4)
    args = (logits, temp, torch.full((4,), 6), ones, torch.zeros(4), 6)
    c, lse = select_candidates(*args, return_lse=True)
    want = torch.softmax(logits / temp.view(-1, 1), -1)
    assert torch.allclose(torch.exp(logits / temp.view(-1, 1) - lse.view(-1, 1)), want,
                          atol=1e-6)
    plain = select_candidates(*args)
    assert torch.equal(c.ids, plain.ids) and torch.equal(c.valid, plain.valid)
    assert torch.allclose(c.base_prob, want.gather(1, c.ids), atol=1e-6)


def test_at_most_stop_token_is_boosted_right_after_a_sentence_end():
    """at_most_end_boost b: a stop slot with `closes` (the output's last token ended a
    sentence) weighs b x its base probability in the soft at_most rule, exactly; without
    `closes`, with b = 1, or in an equal row nothing changes (and an equal row's stop slot keeps
    length 0: the one-token rule is for tokens that end a sentence, not for the stop itself)."""
    base = [[0.6, 0.3, 0.001]]
    p = p_of([[50, 40, 0]])  # slot 2 (id 12) is the stop token

    def q_of(mode, closes, b, target=11):
        c = cand(base)
        c.closes = torch.tensor([closes])
        return decide(c, p, mode=torch.tensor([mode]), target=torch.tensor([target]),
                      generated=torch.tensor([0]), beta=torch.zeros(1),
                      greedy=torch.tensor([False]), gamma=G, is_stop=c.ids == 12,
                      plausibility=0.1, at_most_softness=2.0, at_most_end_boost=b)[0]

    r = 10
    weights = torch.tensor([0.6 * ((1 + r) / 51) ** 2, 0.3 * ((1 + r) / 41) ** 2, 50 * 0.001])
    assert torch.allclose(q_of(MODE_AT_MOST, [False, False, True], 50.0), weights / weights.sum(),
                          atol=1e-5)
    unboosted = q_of(MODE_AT_MOST, [False, False, False], 50.0)
    assert torch.allclose(unboosted, q_of(MODE_AT_MOST, [False, False, True], 1.0))
    assert unboosted[2] < 0.02
    for b in (1.0, 50.0):  # equal: the stop slot's `closes` changes nothing
        assert torch.equal(q_of(MODE_EQUAL, [False, False, True], b, target=3),
                           q_of(MODE_EQUAL, [False, False, False], b, target=3))


def test_equal_undershoot_weighs_a_short_prediction_more():
    """equal_undershoot u: d = u x |distance| below the budget, |distance| above it. Tokens,
    r = 10, lengths 6 and 14: symmetric, the tie goes to the more likely (slot 0, short);
    u = 2 picks the long one; the soft rule weighs base x exp(-lambda d) with that d."""
    from sglang_lenvm.runtime.decision import length_distance

    c = cand([[0.6, 0.4]])
    p = p_of([[6, 14]])
    kw = dict(mode=torch.tensor([MODE_EQUAL]), target=torch.tensor([11]),
              generated=torch.tensor([0]), beta=torch.zeros(1), greedy=torch.tensor([False]),
              gamma=G, equal_distance="tokens")
    assert decide(c, p, **kw).tolist() == [[1, 0]]
    assert decide(c, p, **kw, equal_undershoot=2.0).tolist() == [[0, 1]]
    q = decide(c, p, **kw, equal_undershoot=2.0, equal_softness=0.5)
    d = torch.tensor([2.0 * 4, 4.0])
    want = torch.tensor([0.6, 0.4]) * torch.exp(-0.5 * d)
    assert torch.allclose(q[0], want / want.sum(), atol=1e-4)
    got = length_distance(torch.tensor([1.0, 10.0, 30.0]), torch.tensor(10.0), True, 3.0)
    assert torch.allclose(got, torch.tensor([3 * math.log(11 / 2), 0.0, math.log(31 / 11)]))
