"""Candidate selection and the per-request length decision, batched in plain torch.

This is the CPU path and the reference the Triton kernels are tested against. Shapes: B rows
(guided requests), V vocabulary, K candidate slots per row (the largest candidate count in the
batch; shorter rows have invalid slots).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from sglang_lenvm.config import DEFAULT_EQUAL_DISTANCE, EQUAL_DISTANCES
from sglang_lenvm.returns import remaining_from_p
from sglang_lenvm.schema import MODE_AT_LEAST, MODE_AT_MOST, MODE_EQUAL

NEG_INF = float("-inf")


@dataclasses.dataclass
class Candidates:
    ids: torch.Tensor  # [B, K] int64 token ids, sorted by base probability (descending)
    base_prob: torch.Tensor  # [B, K] float32 base probability (after temperature, full vocab)
    valid: torch.Tensor  # [B, K] bool: inside the row's top-k / top-p / min-p truncation
    # [B, K] bool or None: candidates after which the text stands at a sentence end. On a
    # token: it ends a sentence (the scorer then lets the output stop: its stop token is a
    # candidate of the next step). On a stop slot: the output's last token ended one, so
    # stopping here ends on a full sentence. See `decide`.
    closes: Optional[torch.Tensor] = None


def mask_stop_tokens(logits: torch.Tensor, stop_ids: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: -inf on the stop ids ([B, S], -1 padded) of the rows where `rows` is True.

    Rows where that would leave no finite logit (e.g. a grammar that only allows EOS) are left
    alone: ending is then the only legal continuation.
    """
    # Padding (-1) and rows that are not masked point at a spare column V, so no index ever
    # writes a token's own value back over a stop token's -inf (a stop id may well be 0).
    V = logits.shape[1]
    cols = torch.where((stop_ids >= 0) & rows[:, None], stop_ids, V)
    hit = torch.zeros((logits.shape[0], V + 1), dtype=torch.bool, device=logits.device)
    hit.scatter_(1, cols, True)
    mask_unless_empty(logits, hit[:, :V])


def mask_unless_empty(logits: torch.Tensor, ban: torch.Tensor) -> None:
    """In place: -inf where `ban` [B, V] is True, except in rows that would be left with no
    finite logit: those keep what they had (a ban never makes a request impossible)."""
    masked = logits.masked_fill(ban, NEG_INF)
    still_finite = torch.isfinite(masked).any(dim=1, keepdim=True)
    logits.copy_(torch.where(still_finite, masked, logits))


def select_candidates(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, min_p: torch.Tensor, k_max: int, *,
                      return_lse: bool = False):
    """Top-k / top-p / min-p truncation of softmax(logits / temperature), K = k_max slots.

    top_k [B] is each row's candidate count (<= k_max); top_p / min_p [B] as in SGLang's
    sampler: keep a token while the probability mass before it is < top_p, and while its
    probability is >= min_p * max probability. The most likely token is always kept.
    With return_lse also the row log-sum-exp [B] of logits / temperature, so that any other
    token's probability is one gathered logit (no second softmax over [B, V]).
    """
    scaled = logits.float() / temperature.float().view(-1, 1)
    probs = torch.softmax(scaled, dim=-1)  # as SGLang's sampler rounds (min-p ties)
    k = min(k_max, logits.shape[-1])
    base, ids = torch.topk(probs, k, dim=-1)
    rank = torch.arange(k, device=logits.device).view(1, -1)
    mass_before = torch.cumsum(base, dim=-1) - base
    valid = (rank < top_k.view(-1, 1))
    valid &= mass_before < top_p.float().view(-1, 1)
    valid &= base >= base[:, :1] * min_p.float().view(-1, 1)
    valid &= base > 0  # grammar-masked (-inf) logits are never candidates
    valid[:, 0] |= base[:, 0] > 0
    cand = Candidates(ids=ids, base_prob=base, valid=valid)
    return (cand, torch.logsumexp(scaled, dim=-1)) if return_lse else cand


def stop_mask(ids: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """[B, K] True where a candidate is one of its row's stop tokens (stop_ids -1 padded)."""
    return ((ids.unsqueeze(-1) == stop_ids.unsqueeze(1)) & (stop_ids.unsqueeze(1) >= 0)).any(-1)


def force_stop_value(p: torch.Tensor, ids: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """p = 0 for candidates that are stop tokens of their row (EOS ends the generation)."""
    return torch.where(stop_mask(ids, stop_ids), torch.zeros_like(p), p)


def plausible_slots(cand: Candidates, is_stop: torch.Tensor, plausibility: float) -> torch.Tensor:
    """[B, K] the candidates that compete on length: base >= plausibility x the row's most
    likely valid candidate, that one itself (slot 0) and stop tokens (ending is always possible).

    Every other slot gets q = 0 in every mode of `decide`, so its value is never read: the
    scorer drops those slots before the LenVM forward (`scorer._plan_candidates`).
    """
    valid = cand.valid
    base_max = torch.where(valid, cand.base_prob, torch.zeros_like(cand.base_prob)).amax(1, True)
    plausible = valid & ((cand.base_prob >= plausibility * base_max) | is_stop)
    plausible[:, 0] |= valid[:, 0]  # slot 0 is the most likely candidate
    return plausible


def length_distance(length: torch.Tensor, r: torch.Tensor, ratio: bool,
                    undershoot: float = 1.0) -> torch.Tensor:
    """equal's distance of predicted lengths to the budget r: in ratio |ln(1 + l) - ln(1 + r)|,
    else |l - r|, with a predicted length short of r weighing `undershoot` times as much."""
    diff = torch.log1p(length) - torch.log1p(r) if ratio else length - r
    return torch.where(diff < 0, -diff * undershoot, diff)


def equal_uses_ratio(equal_distance: str) -> bool:
    """True for "ratio", False for "tokens" (how `equal` measures the closest candidate)."""
    if equal_distance not in EQUAL_DISTANCES:
        raise ValueError(f"equal_distance must be one of {EQUAL_DISTANCES}, got {equal_distance!r}")
    return equal_distance == "ratio"


def decide(cand: Candidates, p: torch.Tensor, *, mode: torch.Tensor, target: torch.Tensor,
           generated: torch.Tensor, beta: torch.Tensor, greedy: torch.Tensor,
           gamma: float, is_stop: Optional[torch.Tensor] = None,
           equal_distance: str = DEFAULT_EQUAL_DISTANCE, plausibility: float = 0.0,
           equal_softness: float = math.inf, at_least_end_pull: float = 0.0,
           at_most_softness: float = math.inf, at_most_end_boost: float = 1.0,
           equal_undershoot: float = 1.0,
           must_stop: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The distribution to sample the next token from, over the K candidate slots: q [B, K].

    p [B, K] are the LenVM values of prefix + candidate (stop tokens already 0). With
    r = max(target - generated - 1, 0) the budget left after this token and l(x) the predicted
    remaining length, d(x) = |ln(1 + l(x)) - ln(1 + r)| (equal_distance "ratio") or
    |l(x) - r| ("tokens"), times equal_undershoot where l(x) < r:
      equal:    q(x) ~ base(x) * exp(-equal_softness * d(x)); with equal_softness inf (the
                default) one-hot on the closest x (ties: higher base probability);
      at_most:  base restricted to l(x) <= r (none: one-hot argmin l); while budget is left
                (r >= 1) and only stop tokens fit, the shortest non-stop candidate is
                admissible too (is_stop [B, K] marks the stop slots). With a finite
                at_most_softness, while budget is left: base(x) * exp(-at_most_softness *
                d+(x)) over the plausible candidates, d+(x) = max(0, ln(1 + l(x)) - ln(1 + r))
                how far x's predicted length runs past the budget in ratio (what fits keeps
                its base weight; the last token keeps the hard rule: only a stop token fits);
      at_least: base restricted to l(x) >= r (none: one-hot argmax l); from the target on
                (stop tokens allowed), base(x) * (1 + l(x))^-at_least_end_pull over the
                plausible candidates: a pull toward ending (0: none, the output runs free);
    (l is compared after rounding to the nearest token: l < r + 1/2, l > r - 1/2)
      none:     base over all candidates.
    Only plausible candidates compete on length: base(x) >= plausibility * max base, plus the
    most likely candidate and stop tokens (ending is always possible). A candidate that ends
    a sentence (`cand.closes`) may be the last before the stop token: in equal rows its l(x) is
    1 where 1 is closer to r than l(x) is, in at_most rows min(l(x), 1); right after one, an
    at_most row's stop token (a stop slot with `closes`) weighs at_most_end_boost x its base
    probability. Then
    q ~ q * exp(beta * p) (exponential tilting) for the sampling modes; rows with `must_stop`
    (equal past its overshoot limit) take their most likely stop slot if they have one; greedy
    rows take the argmax of q.
    """
    valid = cand.valid
    length = remaining_from_p(p.float(), gamma)
    r = (target - generated - 1).clamp_min(0).float().view(-1, 1)
    inf = torch.full_like(length, float("inf"))
    mode = mode.view(-1, 1)
    ratio = equal_uses_ratio(equal_distance)
    stop = is_stop if is_stop is not None else torch.zeros_like(valid)
    if cand.closes is not None:
        # The LenVM predicts how long the base model would go on after a full stop, but the
        # scorer can end the output there (it makes the stop token a candidate of the next
        # step), so a sentence end is two ways on: stop after it (1 token left) or go on
        # (l). equal counts the one closer to the budget, at_most the shorter. Without this,
        # equal outputs whose budget ran out mid-sentence were cut at the overshoot limit by a
        # stop token that cost 10 to 31 nats under the base model (README, "Where the text
        # ends"). at_least keeps the LenVM's l: before its target a sentence end is not the end.
        one = torch.ones_like(length)
        closes = cand.closes & ~stop  # on a stop slot `closes` is about the token before
        end_closer = (length_distance(one, r, ratio, equal_undershoot)
                      < length_distance(length, r, ratio, equal_undershoot))
        length = torch.where(closes & (mode == MODE_EQUAL) & end_closer, one, length)
        length = torch.where(closes & (mode == MODE_AT_MOST), length.clamp_max(1.0), length)
    plausible = plausible_slots(cand, stop, plausibility)

    # Ratio: the LenVM's errors are relative (a continuation predicted at 100 tokens may well
    # end at 50) and stopping is final while a continuation is steered again next step. In
    # tokens, r = 25 is closer to EOS (0) than to a continuation predicted at 60, so an
    # over-predicting LenVM ends outputs far too early; in ratio it is not (26/1 vs 61/26).
    # equal_undershoot > 1: ending short of the target costs more than running past it (the
    # length score falls 2.5 times as fast below T as above it).
    dist = torch.where(plausible, length_distance(length, r, ratio, equal_undershoot), inf)
    # A predicted length fits the budget when it rounds to at most (at least) r tokens.
    admissible = torch.where(mode == MODE_AT_MOST, length < r + 0.5,
                             torch.where(mode == MODE_AT_LEAST, length > r - 0.5,
                                         torch.ones_like(valid)))
    admissible &= plausible
    if is_stop is not None:
        # A LenVM that predicts every continuation too long would otherwise leave only EOS
        # admissible and end the output at once, however much budget is left. Keep stopping
        # possible (with its base probability) but also let the shortest continuation in.
        go_on = plausible & ~is_stop
        shortest = torch.nn.functional.one_hot(
            torch.where(go_on, length, inf).argmin(dim=1), valid.shape[1]).bool() & go_on
        rescue = (mode == MODE_AT_MOST) & (r >= 0.5) & ~(admissible & go_on).any(1, keepdim=True)
        admissible |= rescue & shortest
    none_ok = ~admissible.any(dim=1, keepdim=True)
    fallback = torch.where(mode == MODE_AT_MOST, torch.where(plausible, length, inf),
                           torch.where(plausible, -length, inf))
    hard_equal = math.isinf(equal_softness)
    deterministic = (((mode == MODE_EQUAL) & hard_equal)
                     | (((mode == MODE_AT_MOST) | (mode == MODE_AT_LEAST)) & none_ok))
    pick_score = torch.where(mode == MODE_EQUAL, dist, fallback)
    # argmin returns the first minimum: slots are sorted by base probability, so ties go to
    # the more likely token.
    one_hot = torch.nn.functional.one_hot(pick_score.argmin(dim=1), valid.shape[1]).bool()

    # Sampling choices: base probabilities over the admissible set, tilted by exp(beta * p);
    # soft equal: base probabilities weighed by exp(-softness * d) (d is inf off plausible).
    log_base = torch.log(cand.base_prob.clamp_min(1e-30))
    if at_most_end_boost != 1.0 and cand.closes is not None:
        # The soft at_most rule lets the text run toward T, and 61% of its outputs were cut
        # there mid-sentence by the forced stop token, at 13 nats each (README, "Where the text
        # ends"): the base model rarely ends an answer it could go on with, so after a sentence
        # end its stop token had little weight against continuations however far past the
        # budget they were predicted to run. A boost lets the output end where a sentence
        # does, more so as the budget runs out (the continuations' weights fall with their
        # predicted overshoot); being a factor, it keeps the base model's preference among
        # sentence ends (a floor relative to the most likely token ended outputs at the first
        # one, where stopping still cost 9 nats: README).
        lift = (mode == MODE_AT_MOST) & stop & cand.closes
        log_base = torch.where(lift, log_base + math.log(at_most_end_boost), log_base)
    logq = torch.where(admissible, log_base + beta.view(-1, 1) * p.float(),
                       torch.full_like(log_base, NEG_INF))
    if not hard_equal:
        soft = torch.where(plausible, log_base - equal_softness * dist,
                           torch.full_like(log_base, NEG_INF))
        logq = torch.where(mode == MODE_EQUAL, soft, logq)
    if not math.isinf(at_most_softness):
        # The hard rule, with a LenVM that over-predicts, walks the shortest continuation at
        # every step and is then cut at T by the forced stop token, mid-sentence (12 to 28 nats
        # under the base model in benchmarks/results/decision_frontier_bounds.json). Softly, the base model keeps its say
        # among the continuations, and ending gains weight on them as the budget runs out.
        over = (torch.log1p(length) - torch.log1p(r)).clamp_min(0)
        soft_at_most = torch.where(plausible, log_base + beta.view(-1, 1) * p.float()
                                   - at_most_softness * over, torch.full_like(log_base, NEG_INF))
        open_budget = (mode == MODE_AT_MOST) & (r >= 0.5)
        logq = torch.where(open_budget, soft_at_most, logq)
        deterministic = deterministic & ~open_budget
    if at_least_end_pull > 0:
        # Past its target an at_least output is free to end; a 135M model that was kept from
        # stopping tends to ramble on into loops. Pull toward ending, softly.
        past = (mode == MODE_AT_LEAST) & (generated.view(-1, 1) + 1 >= target.view(-1, 1))
        pull = torch.where(plausible, log_base + beta.view(-1, 1) * p.float()
                           - at_least_end_pull * torch.log1p(length),
                           torch.full_like(log_base, NEG_INF))
        logq = torch.where(past, pull, logq)
        deterministic = deterministic & ~past
    q = torch.softmax(logq, dim=1)
    q = torch.where(deterministic, one_hot.float(), q)
    if must_stop is not None:
        stop_slots = valid & stop
        best_stop = torch.where(stop_slots, cand.base_prob, torch.full_like(log_base, -1.0))
        stop_pick = torch.nn.functional.one_hot(best_stop.argmax(dim=1), valid.shape[1]).float()
        force = must_stop.view(-1, 1) & stop_slots.any(1, keepdim=True)
        q = torch.where(force, stop_pick, q)
    greedy_pick = torch.nn.functional.one_hot(q.argmax(dim=1), q.shape[1]).float()
    return torch.where(greedy.view(-1, 1), greedy_pick, q)


@dataclasses.dataclass
class HeadDecision:
    p_all: torch.Tensor  # [B, T] sigmoid(z) of every tree row (root included), raw
    p_cand: torch.Tensor  # [B, K] candidate values: stop tokens 0, NaN -> 0
    q: torch.Tensor  # [B, K] distribution over the candidate slots (one-hot if chosen)
    cand_ok: torch.Tensor  # [B] bool: every valid candidate had a finite value


def decide_from_values(p_all: torch.Tensor, cand: Candidates, stop_ids: torch.Tensor, *,
                       has_root: bool, mode, target, generated, beta, greedy,
                       gamma: float, equal_distance: str = DEFAULT_EQUAL_DISTANCE,
                       plausibility: float = 0.0, equal_softness: float = math.inf,
                       at_least_end_pull: float = 0.0, at_most_softness: float = math.inf,
                       at_most_end_boost: float = 1.0, equal_undershoot: float = 1.0,
                       must_stop: Optional[torch.Tensor] = None) -> HeadDecision:
    """Star-tree values [B, T] -> stop tokens at 0, NaN guard, decision (the torch path).

    `sglang_lenvm.kernels.value_head_decision` fuses this with the value head on GPU.
    """
    is_stop = stop_mask(cand.ids, stop_ids)
    p_cand = torch.where(is_stop, torch.zeros_like(p_all[:, int(has_root):]),
                         p_all[:, int(has_root):])
    cand_ok = torch.where(cand.valid, torch.isfinite(p_cand), torch.ones_like(cand.valid)).all(1)
    p_cand = torch.nan_to_num(p_cand, nan=0.0)
    q = decide(cand, p_cand, mode=mode, target=target, generated=generated, beta=beta,
               greedy=greedy, gamma=gamma, is_stop=is_stop, equal_distance=equal_distance,
               plausibility=plausibility, equal_softness=equal_softness,
               at_least_end_pull=at_least_end_pull, at_most_softness=at_most_softness,
               at_most_end_boost=at_most_end_boost, equal_undershoot=equal_undershoot,
               must_stop=must_stop)
    return HeadDecision(p_all, p_cand, q, cand_ok)


def distribution_to_logits(q: torch.Tensor, ids: torch.Tensor, vocab: int,
                           temperature: torch.Tensor) -> torch.Tensor:
    """Logits over the vocabulary that make SGLang's sampler draw from q.

    The sampler divides by the row's temperature before its softmax, so we pre-multiply.
    Tokens outside the candidate set (or with q = 0) get -inf. A token id may occupy two slots
    (an appended stop candidate); their probabilities add up.
    """
    probs = torch.zeros((q.shape[0], vocab), dtype=torch.float32, device=q.device)
    probs.scatter_add_(1, ids, q.float())
    logp = torch.where(probs > 0, torch.log(probs.clamp_min(1e-30)),
                       torch.full_like(probs, NEG_INF))
    return logp * temperature.float().view(-1, 1)
