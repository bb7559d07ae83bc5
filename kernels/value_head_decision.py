"""Fused LenVM value head + per-request length decision in Triton (two launches).

Reference (torch): the runtime's `ValueHead` (z = summary(SiLU(fc(h.float())))),
p = sigmoid(z), then `decide_from_values` (stop tokens, NaN handling, `decide`);
tests/test_kernel_value_head_decision.py composes exactly those.

A leaf module: nothing here imports the runtime. The mode codes and the equal distance arrive
as arguments (compile-time constants of the kernel); results are plain tensors.

Why two launches, not one: the decision for a request needs the values of all its candidates,
and each value needs a full H-wide reduction of the fc output. Computing fc for a request's
rows inside one program would serialise the H x H float32 weight (9.4 MB for H = 1536) through a
handful of programs; splitting the fc output columns over programs instead (what makes the GEMM
fast) leaves partial z sums in different programs, and Triton has no grid-wide barrier. So:

1. `_value_head_kernel`, grid (row blocks, fc column blocks): acc = h @ fc.W^T over H, + bias,
   SiLU, then the dot with `summary.weight` restricted to the block's columns -> one partial z
   per row and column block, written to `zpart[col_block, row]` (no atomics: deterministic).
   The fc GEMM runs on tensor cores in 3xTF32 ("tf32x3"), which keeps float32 accuracy: the
   head is float32 on purpose (p near 1 is where ln(1-p)/ln(gamma) is most sensitive).
2. `_decision_kernel`, grid (B,): sums the partials + summary bias, sigmoid, stop tokens -> 0,
   NaN -> 0 (with a per-row `cand_ok` flag as the scorer keeps), remaining length (a sentence
   end may be 1 token from the end: decide()), the plausibility floor, the equal and at_most
   (hard or soft) / at_least rules with decide()'s
   +-1/2 rounding tolerance, beta tilting, the forced stop past equal's overshoot limit and
   greedy argmax, writing q over the candidate slots.

Rows of `hidden` are request-major star trees: row b * T + t, t = 0 the root when has_root, and
candidate slot j at t = has_root + j. `mode` holds the caller's codes, given as `mode_codes`
(equal, at_most, at_least); any other code steers nothing.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl


class DecisionTensors(NamedTuple):
    p_all: torch.Tensor  # [B, T] sigmoid(z) of every tree row (root included), raw
    p_cand: torch.Tensor  # [B, K] candidate values: stop tokens 0, NaN -> 0
    q: torch.Tensor  # [B, K] distribution over the candidate slots (one-hot if chosen)
    cand_ok: torch.Tensor  # [B] bool: every valid candidate had a finite value


@triton.jit
def _value_head_kernel(
    X, W, BIAS, WS, ZPART, n_rows, hidden,
    stride_x, stride_w, stride_zp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < hidden
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < hidden
        # h.float(): the head is float32 whatever the backbone dtype
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        # nn.Linear weight is [out, in]: the [in, out] tile of W^T
        w = tl.load(W + cols[None, :].to(tl.int64) * stride_w + kk[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    acc += tl.load(BIAS + cols, mask=col_ok, other=0.0)[None, :]
    act = acc * tl.sigmoid(acc)  # SiLU
    ws = tl.load(WS + cols, mask=col_ok, other=0.0)  # zero outside H: padded columns add 0
    part = tl.sum(act * ws[None, :], 1)
    tl.store(ZPART + tl.program_id(1) * stride_zp + rows, part, mask=row_ok)


@triton.jit
def _log1p_neg(x):
    """log1p(-x) for 0 <= x < 1, accurate near 0 (Goldberg's trick; no log1p in tl.math)."""
    u = 1.0 - x
    exact = u == 1.0
    return tl.where(exact, -x, tl.log(u) * (-x) / tl.where(exact, 1.0, u - 1.0))


@triton.jit
def _length_distance(length, r, undershoot, EQUAL_RATIO: tl.constexpr):
    """equal's distance to the budget (decision.length_distance)."""
    if EQUAL_RATIO:
        diff = tl.log(1.0 + length) - tl.log(1.0 + r)
    else:
        diff = length - r
    return tl.where(diff < 0, -diff * undershoot, diff)


@triton.jit
def _decision_kernel(
    ZPART, SUMMARY_BIAS, IDS, BASE, VALID, CLOSES, STOP, MODE, TARGET, GENERATED, BETA, GREEDY,
    MUST_STOP, P_ALL, P_CAND, Q, CAND_OK,
    n_parts, tree_size, num_cand, num_stop, log_gamma, plausibility, softness, end_pull,
    at_most_softness, log_end_boost, undershoot,
    stride_zp, stride_ids, stride_base, stride_valid, stride_closes, stride_stop,
    stride_pa, stride_pc, stride_q,
    ROOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr, EQUAL_RATIO: tl.constexpr, SOFT_EQUAL: tl.constexpr,
    SOFT_AT_MOST: tl.constexpr, HAS_MUST_STOP: tl.constexpr, HAS_CLOSES: tl.constexpr,
    EQUAL: tl.constexpr, AT_MOST: tl.constexpr, AT_LEAST: tl.constexpr,
):
    b = tl.program_id(0)
    bias = tl.load(SUMMARY_BIAS)
    row0 = b * tree_size

    # z of every tree row: the column-block partials + the summary bias.
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < tree_size
    z_all = tl.zeros([BLOCK_T], tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < num_cand
    z = tl.zeros([BLOCK_K], tl.float32)
    for part in range(0, n_parts):
        base_ptr = ZPART + part * stride_zp + row0
        z_all += tl.load(base_ptr + offs_t, mask=t_ok, other=0.0)
        z += tl.load(base_ptr + ROOT + offs_k, mask=k_ok, other=0.0)
    tl.store(P_ALL + b * stride_pa + offs_t, tl.sigmoid(z_all + bias), mask=t_ok)
    p = tl.sigmoid(z + bias)

    # Stop tokens end the generation: value 0 (force_stop_value).
    ids = tl.load(IDS + b * stride_ids + offs_k, mask=k_ok, other=-1)
    offs_s = tl.arange(0, BLOCK_S)
    stop = tl.load(STOP + b * stride_stop + offs_s, mask=offs_s < num_stop, other=-1)
    is_stop = tl.sum(((ids[:, None] == stop[None, :]) & (stop[None, :] >= 0)).to(tl.int32), 1) > 0
    p = tl.where(is_stop, 0.0, p)
    valid = tl.load(VALID + b * stride_valid + offs_k, mask=k_ok, other=0).to(tl.int1)
    # The scorer's health check: a NaN value on a valid slot marks the row unusable.
    finite = (p == p) & (tl.abs(p) < float("inf"))
    bad = tl.sum((valid & ~finite).to(tl.int32), 0)
    tl.store(CAND_OK + b, bad == 0)
    p = tl.where(p == p, p, 0.0)  # nan_to_num(nan=0): sigmoid is never +-inf
    tl.store(P_CAND + b * stride_pc + offs_k, p, mask=k_ok)

    # Predicted remaining length and the budget left after this token (decide()).
    # clamp to 1 - float32 eps as returns.remaining_from_p does for float32
    length = _log1p_neg(tl.minimum(tl.maximum(p, 0.0), 1.0 - 1.1920928955078125e-07)) / log_gamma
    mode = tl.load(MODE + b)
    r = tl.maximum(tl.load(TARGET + b) - tl.load(GENERATED + b) - 1, 0).to(tl.float32)
    if HAS_CLOSES:  # a sentence end: stop after it (1 left) or go on (decide())
        closes = tl.load(CLOSES + b * stride_closes + offs_k, mask=k_ok, other=0).to(tl.int1)
        ends = closes & ~is_stop  # on a stop slot `closes` is about the token before
        end_closer = (_length_distance(length * 0.0 + 1.0, r, undershoot, EQUAL_RATIO)
                      < _length_distance(length, r, undershoot, EQUAL_RATIO))
        length = tl.where(ends & (mode == EQUAL) & end_closer, 1.0, length)
        length = tl.where(ends & (mode == AT_MOST), tl.minimum(length, 1.0), length)
    INF = float("inf")
    # Plausibility floor: only candidates with base >= plausibility x the row's most likely
    # compete on length; slot 0 (the most likely) and stop tokens always do.
    base = tl.load(BASE + b * stride_base + offs_k, mask=k_ok, other=0.0)
    base_max = tl.max(tl.where(valid, base, 0.0), 0)
    plausible = valid & ((base >= plausibility * base_max) | is_stop | (offs_k == 0))
    # equal_distance "ratio" or "tokens", undershoot weighed (decide() says why)
    dist = tl.where(plausible, _length_distance(length, r, undershoot, EQUAL_RATIO), INF)
    admissible = tl.where(mode == AT_MOST, length < r + 0.5,
                          tl.where(mode == AT_LEAST, length > r - 0.5, True)) & plausible
    # at_most with budget left where only stop tokens fit: the shortest non-stop candidate is
    # admissible too (decide()), so a LenVM that predicts every continuation too long does
    # not end the output at once.
    go_on = plausible & ~is_stop & k_ok
    shortest = offs_k == tl.argmin(tl.where(go_on, length, INF), 0, tie_break_left=True)
    go_on_fits = tl.sum((admissible & go_on).to(tl.int32), 0) > 0
    rescue = (mode == AT_MOST) & (r >= 0.5) & ~go_on_fits
    admissible = admissible | (rescue & shortest & go_on)
    none_ok = tl.sum(admissible.to(tl.int32), 0) == 0
    fallback = tl.where(mode == AT_MOST, tl.where(plausible, length, INF),
                        tl.where(plausible, -length, INF))
    deterministic = ((mode == AT_MOST) | (mode == AT_LEAST)) & none_ok
    if not SOFT_EQUAL:
        deterministic = deterministic | (mode == EQUAL)
    pick_score = tl.where(mode == EQUAL, dist, fallback)
    pick_score = tl.where(k_ok, pick_score, INF)
    # first minimum: slots are sorted by base probability, ties go to the more likely token
    one_hot = (offs_k == tl.argmin(pick_score, 0, tie_break_left=True)).to(tl.float32)

    # Sampling: base probabilities over the admissible set, tilted by exp(beta * p); soft
    # equal: base probabilities weighed by exp(-softness * d) over the plausible set. Like
    # torch.softmax, a row with nothing admissible yields NaN (decide() then uses the one-hot,
    # or the row is unused).
    log_base = tl.log(tl.maximum(base, 1e-30))
    if HAS_CLOSES:  # at_most right after a sentence end: its stop token boosted (decide())
        lift = (mode == AT_MOST) & is_stop & closes
        log_base = tl.where(lift, log_base + log_end_boost, log_base)
    logq = tl.where(admissible, log_base + tl.load(BETA + b) * p, float("-inf"))
    if SOFT_EQUAL:
        soft = tl.where(plausible, log_base - softness * dist, float("-inf"))
        logq = tl.where(mode == EQUAL, soft, logq)
    if SOFT_AT_MOST:  # at_most with budget left: exp(-softness * overshoot in ratio) (decide())
        over = tl.maximum(tl.log(1.0 + length) - tl.log(1.0 + r), 0.0)
        soft_m = tl.where(plausible, log_base + tl.load(BETA + b) * p - at_most_softness * over,
                          float("-inf"))
        open_budget = (mode == AT_MOST) & (r >= 0.5)
        logq = tl.where(open_budget, soft_m, logq)
        deterministic = deterministic & ~open_budget
    # at_least past its target: a soft pull toward ending (decide())
    past = (mode == AT_LEAST) & (tl.load(GENERATED + b) + 1 >= tl.load(TARGET + b)) & (end_pull > 0)
    pull = log_base + tl.load(BETA + b) * p - end_pull * tl.log(1.0 + length)
    logq = tl.where(past, tl.where(plausible, pull, float("-inf")), logq)
    deterministic = deterministic & ~past
    e = tl.exp(logq - tl.max(logq, 0))
    q = e / tl.sum(e, 0)
    q = tl.where(deterministic, one_hot, q)
    if HAS_MUST_STOP:  # equal past its overshoot limit: its most likely stop slot, if any
        stop_slots = valid & is_stop & k_ok
        best_stop = tl.where(stop_slots, base, -1.0)
        stop_pick = (offs_k == tl.argmax(best_stop, 0, tie_break_left=True)).to(tl.float32)
        force = (tl.load(MUST_STOP + b) != 0) & (tl.sum(stop_slots.to(tl.int32), 0) > 0)
        q = tl.where(force, stop_pick, q)
    # greedy: argmax of q (torch's argmax takes a NaN as the maximum)
    score = tl.where(q == q, q, INF)
    score = tl.where(k_ok, score, -1.0)
    greedy_pick = (offs_k == tl.argmax(score, 0, tie_break_left=True)).to(tl.float32)
    greedy = tl.load(GREEDY + b).to(tl.int1)
    q = tl.where(greedy, greedy_pick, q)
    tl.store(Q + b * stride_q + offs_k, q, mask=k_ok)


def _precision(device: torch.device) -> str:
    # 3xTF32 on NVIDIA tensor cores ~ float32 accuracy; IEEE elsewhere (the interpreter ignores it)
    if device.type == "cuda" and torch.version.hip is None:
        return "tf32x3"
    return "ieee"


def value_head_partials(hidden: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                        summary_weight: torch.Tensor) -> torch.Tensor:
    """Launch 1: [N, H] hidden -> zpart [col blocks, N] (z = zpart.sum(0) + summary bias)."""
    n, h = hidden.shape
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    fc_weight = fc_weight.contiguous()
    summary_weight = summary_weight.reshape(-1).contiguous()
    # Small batches: narrower column blocks so that more programs share the weight read.
    block_m = max(16, min(64, triton.next_power_of_2(max(n, 1))))
    block_n = 32 if n <= 64 else 64
    block_k = 32
    parts = triton.cdiv(h, block_n)
    zpart = torch.empty((parts, max(n, 1)), dtype=torch.float32, device=hidden.device)
    if n == 0:
        return zpart[:, :0]
    _value_head_kernel[(triton.cdiv(n, block_m), parts)](
        hidden, fc_weight, fc_bias, summary_weight, zpart, n, h,
        hidden.stride(0), fc_weight.stride(0), zpart.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=_precision(hidden.device), num_warps=4, num_stages=3,
    )
    return zpart


def value_head_triton(hidden: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                      summary_weight: torch.Tensor, summary_bias: torch.Tensor) -> torch.Tensor:
    """Raw values z [N] (float32) like the runtime's `ValueHead`, for forwards without a
    decision."""
    zpart = value_head_partials(hidden, fc_weight, fc_bias, summary_weight)
    return zpart.sum(0) + summary_bias.float()


def value_head_decision_triton(hidden, fc_weight, fc_bias, summary_weight, summary_bias, *,
                               ids, base_prob, valid, stop_ids, has_root: bool, mode, target,
                               generated, beta, greedy, gamma: float,
                               mode_codes: Tuple[int, int, int], equal_ratio: bool,
                               plausibility: float = 0.0, equal_softness: float = math.inf,
                               at_least_end_pull: float = 0.0, at_most_softness: float = math.inf,
                               at_most_end_boost: float = 1.0, equal_undershoot: float = 1.0,
                               must_stop=None, closes=None) -> DecisionTensors:
    """hidden [B*T, H] star-tree states -> values and the decision for B requests.

    ids / base_prob / valid [B, K] are the candidates (K = T - has_root), stop_ids [B, S] -1
    padded; mode / target / generated / beta / greedy / must_stop [B]; mode_codes the values
    of `mode` that mean (equal, at_most, at_least); equal_ratio: equal compares
    ln(1 + length) (else the length itself); closes [B, K] bool or None: `Candidates.closes`
    (tokens that end a sentence; stop slots right after one); the other knobs as in the
    runtime's `decide`.
    """
    B, K = ids.shape
    T = K + int(has_root)
    assert hidden.shape[0] == B * T and K >= 1, (hidden.shape, ids.shape, has_root)
    equal, at_most, at_least = (int(c) for c in mode_codes)
    dev = hidden.device
    zpart = value_head_partials(hidden, fc_weight, fc_bias, summary_weight)
    p_all = torch.empty((B, T), dtype=torch.float32, device=dev)
    p_cand = torch.empty((B, K), dtype=torch.float32, device=dev)
    q = torch.empty((B, K), dtype=torch.float32, device=dev)
    cand_ok = torch.empty((B,), dtype=torch.bool, device=dev)
    if B == 0:
        return DecisionTensors(p_all, p_cand, q, cand_ok)
    stop_ids = stop_ids if stop_ids.numel() else torch.full((B, 1), -1, dtype=torch.int64,
                                                             device=dev)
    # the kernel indexes rows by stride and elements contiguously (no-ops for the scorer's tensors)
    ids, base_prob, valid, stop_ids, mode, target, generated, beta, greedy = (
        x.contiguous() for x in (ids, base_prob.float(), valid, stop_ids, mode, target,
                                 generated, beta.float(), greedy))
    must = must_stop.contiguous() if must_stop is not None else greedy  # unread without it
    ends = closes.contiguous() if closes is not None else valid  # unread without it
    soft = not math.isinf(equal_softness)
    soft_at_most = not math.isinf(at_most_softness)
    _decision_kernel[(B,)](
        zpart, summary_bias.reshape(-1).float(), ids, base_prob, valid, ends, stop_ids, mode,
        target,
        generated, beta, greedy, must, p_all, p_cand, q, cand_ok,
        zpart.shape[0], T, K, stop_ids.shape[1], math.log(gamma), float(plausibility),
        float(equal_softness) if soft else 0.0, float(at_least_end_pull),
        float(at_most_softness) if soft_at_most else 0.0, math.log(at_most_end_boost),
        float(equal_undershoot),
        zpart.stride(0), ids.stride(0), base_prob.stride(0), valid.stride(0), ends.stride(0),
        stop_ids.stride(0),
        p_all.stride(0), p_cand.stride(0), q.stride(0),
        ROOT=int(bool(has_root)), BLOCK_T=max(2, triton.next_power_of_2(T)),
        BLOCK_K=max(2, triton.next_power_of_2(K)),
        BLOCK_S=max(2, triton.next_power_of_2(stop_ids.shape[1])),
        EQUAL_RATIO=bool(equal_ratio), SOFT_EQUAL=soft, SOFT_AT_MOST=soft_at_most,
        HAS_MUST_STOP=must_stop is not None, HAS_CLOSES=closes is not None, EQUAL=equal,
        AT_MOST=at_most, AT_LEAST=at_least,
        num_warps=1,
    )
    return DecisionTensors(p_all, p_cand, q, cand_ok)
