"""One guided sampling step for the whole batch: candidates -> star forward -> decision.

Called from the base model's sampling path after SGLang's own logit processing (logit bias,
grammar mask, penalties), so candidates respect all of them. One interface, two
implementations: plain torch on CPU (decision.py, star_attention.py) and the Triton kernels
of `sglang_lenvm.kernels` on GPU (candidates, star attention, fused value head + decision).
The decision is handed back to SGLang's sampler as logits: -inf outside the chosen
distribution, log-probabilities times the row's temperature inside it (the sampler divides by
the temperature again), with the row's top-k/top-p/min-p neutralized because the truncation
already happened here. Rows that do not steer are left exactly as they were.

The phases of `score_rows`: `_plan_candidates` (selection, the stop-token slot), the star
forward (`_values_and_decision`, with the decision fused on GPU), `_to_logits`. The step runs
under fault isolation (faults.isolated): if the batch fails, each row is scored alone, and a
row that still fails is quarantined and samples unguided.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional

import torch

from sglang_lenvm.runtime import faults, repeat_guard
from sglang_lenvm.runtime.attached import fault_of
from sglang_lenvm.runtime.decision import (
    Candidates,
    HeadDecision,
    decide_from_values,
    distribution_to_logits,
    equal_uses_ratio,
    mask_stop_tokens,
    plausible_slots,
    select_candidates,
    stop_mask,
)
from sglang_lenvm.runtime.length_state import LengthState
from sglang_lenvm.runtime.outputs import LenVMDeviceOutput
from sglang_lenvm.runtime.star_attention import StarMeta
from sglang_lenvm.runtime.worker import LenVMWorker
from sglang_lenvm.schema import MODE_AT_LEAST, MODE_AT_MOST, MODE_EQUAL, NEVER

logger = logging.getLogger(__name__)

TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary"


@dataclasses.dataclass
class StepResult:
    """What scoring some rows produced, before it is written into the batch."""

    rows: torch.Tensor  # [n] batch rows
    use: Optional[torch.Tensor]  # [n] bool: rows whose sampling distribution is replaced
    logits: Optional[torch.Tensor]  # [n, V] the replacement
    neutralize: Optional[torch.Tensor]  # [n] bool: rows whose own truncation is switched off
    output: LenVMDeviceOutput


def scoring_rows(state: LengthState, is_decode: bool) -> List[int]:
    """Rows the LenVM works on this step: active, not quarantined, and (in a prefill) at the
    last chunk of their prompt: an intermediate chunk samples nothing, so it is only mirrored."""
    return [i for i, a in enumerate(state.active)
            if a and fault_of(state.reqs[i]) is None and (is_decode or state.final_chunk[i])]


def row_groups(state: LengthState, rows: List[int], R: int, max_tokens: int) -> List[List[int]]:
    """The rows in consecutive groups whose star trees hold at most `max_tokens` tokens
    together (from host-known sizes: root, top_k candidates and a stop slot per steering row),
    one forward each; almost always one group. A tree is never split."""
    groups, size = [[]], 0
    for i in rows:
        tree = R + (min(state.top_ks[i], state.num_candidates) + 1 if state.steer[i] else 0)
        if groups[-1] and size + tree > max_tokens:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += tree
    return groups


def score_step(worker: LenVMWorker, logits_output, sampling_info, forward_batch) -> None:
    state: Optional[LengthState] = getattr(sampling_info, "lenvm_state", None)
    if state is None or not state.any_active:
        return
    mode = forward_batch.forward_mode
    is_decode = mode.is_decode()
    if not (is_decode or mode.is_extend()):
        return
    rows = scoring_rows(state, is_decode)
    if not rows:
        return
    logits = logits_output.next_token_logits
    results = []
    groups = state.memo(("groups", tuple(rows), is_decode), lambda: row_groups(
        state, rows, int(is_decode), worker.config.max_star_tokens))
    for group in groups:
        how, result = faults.isolated(
            "scoring", [state.reqs[i] for i in group],
            lambda g=group: score_rows(worker, logits, sampling_info, forward_batch, state, g,
                                       is_decode),
            lambda j, g=group: score_rows(worker, logits, sampling_info, forward_batch, state,
                                          [g[j]], is_decode))
        results += [result] if how == "batch" else [r for r in result if r is not None]
    outputs = []
    for r in results:
        if r.logits is not None:
            logits[r.rows] = torch.where(r.use.view(-1, 1), r.logits.to(logits.dtype),
                                         logits[r.rows])
            _neutralize_truncation(sampling_info, r.rows, r.neutralize)
        outputs.append(r.output)
    forward_batch.lenvm_output = outputs


def score_rows(worker: LenVMWorker, logits: torch.Tensor, sampling_info, forward_batch,
               state: LengthState, rows: List[int], is_decode: bool) -> StepResult:
    rids = state.rids(rows)
    index = state.device_index(rows)  # no host-to-device copy in a steady batch
    st = state.rows(index)
    seq_lens = forward_batch.seq_lens[index]
    generated = seq_lens - st.prompt_len  # tokens generated before this step's token
    steer_host = [state.steer[i] for i in rows]
    steer = st.steer_flag
    temps = sampling_info.temperatures.view(-1)[index]
    B = len(rows)
    if worker.candidate_vocab is not None:
        # No row that uses the LenVM may sample an id it cannot embed, whatever this step's
        # decision (value-only rows and fallback rows sample from these logits as they are).
        logits[index, worker.candidate_vocab:] = float("-inf")

    cand = must_stop = None
    if state.num_candidates > 0 and any(steer_host):
        cand, must_stop = _plan_candidates(worker, logits[index].float(), temps, st,
                                           sampling_info, index, steer, state, rows, seq_lens,
                                           forward_batch)
    K = cand.ids.shape[1] if cand is not None else 0

    # The star trees: [root] + candidates. Decode roots are the step's input tokens, written
    # to their own KV slots (the mirror); prefill rows were mirrored after the base forward.
    # One-pass scoring: the trees are roots only, and the candidate head scores the candidates
    # from the state's hidden state (the root's, or the prompt's last token's in a prefill).
    R = 1 if is_decode else 0
    one_pass = worker.candidate_head is not None and K > 0
    tree_k = 0 if one_pass else K
    T = R + tree_k
    decision = hidden = None
    if T == 0:
        p_state = torch.sigmoid(forward_batch.lenvm_last_z[index])
        if one_pass:
            hidden = forward_batch.lenvm_last_h[index]
    else:
        parts, pos = [], []
        prefix = seq_lens - R
        if R:
            parts.append(forward_batch.input_ids[index].view(-1, 1))
            pos.append(prefix.view(-1, 1))
        if tree_k:
            parts.append(cand.ids)
            pos.append((prefix + R).view(-1, 1).expand(B, K))
        packed = (_packed_positions(worker, state, rows, cand, R, st.stop_ids) if tree_k
                  else None)
        meta = StarMeta(
            req_pool_indices=forward_batch.req_pool_indices[index],
            prefix_lens=prefix,
            max_prefix_len=_host_max(forward_batch, rows, R),
            tree_size=T,
            has_root=bool(R),
            root_slots=forward_batch.out_cache_loc[index] if R else None,
            packed=packed,
        )
        tokens, positions = torch.cat(parts, 1).view(-1), torch.cat(pos, 1).reshape(-1)
        if packed is not None:
            tokens, positions = tokens[packed], positions[packed]
        faults.inject("star", rids)
        # A shared trunk (one-pass only, so the trees here are roots only): the roots enter
        # at the LenVM's first own layer with the base model's stream for these rows.
        trunk = worker.trunk_input(forward_batch)
        embeds = trunk[index] if trunk is not None else None
        if one_pass:
            hidden = worker.star_hidden(tokens, positions, meta, embeds)  # [B, H]: roots only
            p_all = torch.sigmoid(worker.model.v_head(hidden)).view(B, 1)
        elif K:
            decision = _values_and_decision(worker, tokens, positions, meta, cand, st, generated,
                                            must_stop, rids)
            p_all = decision.p_all
        else:
            p_all = torch.sigmoid(worker.star(tokens, positions, meta, embeds))
        p_state = p_all[:, 0] if R else torch.sigmoid(forward_batch.lenvm_last_z[index])
    if one_pass:
        decision = _one_pass_decision(worker, hidden, p_state, cand, st, generated, must_stop,
                                      bool(R), rids)

    ok = torch.isfinite(p_state)
    use = new = neutralize = None
    if decision is not None:
        ok = ok & decision.cand_ok
        new = distribution_to_logits(decision.q, cand.ids, logits.shape[1], temps)
        use = steer & ok
        neutralize = use & ~st.greedy
    output = LenVMDeviceOutput(
        batch_rows=list(rows),
        rows_device=index,
        want_values=[state.want_values[i] for i in rows],
        p_state=p_state.float(),
        ok=ok,
        gamma=worker.gamma,
        cand_ids=cand.ids if decision is not None else None,
        # -1 marks the slots that were not candidates (their value was never computed)
        p_cand=(decision.p_cand.masked_fill(~cand.valid, -1.0) if decision is not None
                else None),
    )
    return StepResult(index, use, new, neutralize, output)


def _plan_candidates(worker, row_logits, temps, st, sampling_info, index, steer, state, rows,
                     seq_lens, forward_batch):
    """The steering rows' candidates, plus each row's stop-token slot where it must be one,
    with the candidates that end a sentence marked (`Candidates.closes`, when that rule is
    on); and which rows must stop (equal past its overshoot limit; None: no row)."""
    host_modes = {state.modes[i] for i in rows if state.steer[i]}
    generated = seq_lens - st.prompt_len  # tokens generated before this step's token
    # at_least rows whose target this step's token reaches or passes (decide()'s `past`)
    at_least_past = (st.mode == MODE_AT_LEAST) & (generated + 1 >= st.target)
    if MODE_AT_LEAST in host_modes:
        # SGLang's min_new_tokens (set at admission) already masks the stop tokens until the
        # target; this keeps the candidates right even if a request reached us without it.
        at_least_open = (st.mode == MODE_AT_LEAST) & ~at_least_past & steer
        mask_stop_tokens(row_logits, st.stop_ids, at_least_open)
    if worker.config.repeat_ngram:
        if forward_batch.forward_mode.is_decode():
            repeat_guard.record(state.recent, index, generated, forward_batch.input_ids[index])
        history = repeat_guard.ordered(state.recent[index], generated)
        repeat_guard.mask_repeats(row_logits, history, steer,
                                  worker.config.repeat_ngram, worker.config.repeat_limit,
                                  worker.token_classes)
    cand, probs_of = _candidates(worker, row_logits, temps, st, sampling_info, index,
                                 state.num_candidates)
    cand.valid &= steer.view(-1, 1)
    cand.valid[:, 0] |= steer & (cand.base_prob[:, 0] > 0)
    # Candidates under the plausibility floor never win (decide gives them q = 0 in every
    # mode), so they are not candidates at all: the star forward does not compute them. With
    # the default floor (0.1) and top_k = 15 most rows keep a few of their 15 slots.
    cand.valid = plausible_slots(cand, stop_mask(cand.ids, st.stop_ids),
                                 worker.config.plausibility)
    if not worker.use_kernels:
        cand = _drop_unused_slots(cand)
    must_stop = None
    equal_near = MODE_EQUAL in host_modes and _equal_stop_near(state, forward_batch, rows)
    # An equal output may stop right after a sentence end (its stop token, however unlikely
    # the truncation found it, competes on length: decide() counts that end as 1 token away).
    # So may an at_least output past its target: the base model that was kept from stopping
    # rarely puts its stop token in the top-k of a text it could go on with, and without it
    # the output rambled on to 2-4x its target (README, "The repetition guard"); with it,
    # decide()'s end pull weighs stopping against going on.
    after_end = ((MODE_EQUAL in host_modes or MODE_AT_LEAST in host_modes)
                 and worker.sentence_ends is not None and forward_batch.forward_mode.is_decode())
    ended = None  # [B] the output's last token (this decode step's input) ended a sentence
    if worker.sentence_ends is not None and forward_batch.forward_mode.is_decode():
        ended = _sentence_end_of(worker, forward_batch.input_ids[index].clamp_min(0))
    if MODE_AT_MOST in host_modes or equal_near or after_end:
        stop_rows = (st.mode == MODE_AT_MOST) & steer
        if equal_near:
            must_stop = (st.mode == MODE_EQUAL) & steer & (seq_lens >= st.equal_stop_seq_len)
            stop_rows |= must_stop
        if after_end:
            stop_rows |= ((st.mode == MODE_EQUAL) | at_least_past) & steer & ended
        cand = _with_stop_candidate(cand, probs_of, st.stop_ids, stop_rows)
    if worker.sentence_ends is not None:
        # Tokens: they end a sentence. Stop slots: the text before them did (decode only: in
        # a prefill the last token is the prompt's).
        closes = _sentence_end_of(worker, cand.ids)
        at_end = ended.view(-1, 1) if ended is not None else torch.zeros_like(closes)
        cand.closes = torch.where(stop_mask(cand.ids, st.stop_ids), at_end, closes)
    return cand, must_stop


def _sentence_end_of(worker, ids: torch.Tensor) -> torch.Tensor:
    """True where ids end a sentence (ids past the table, padding rows, never do)."""
    table = worker.sentence_ends
    inside = ids < table.shape[0]
    return table[ids.clamp(max=table.shape[0] - 1)] & inside


def _with_stop_candidate(cand: Candidates, probs_of, stop_ids: torch.Tensor,
                         rows: torch.Tensor) -> Candidates:
    """Append each row's most likely stop token as one more candidate where `rows`.

    Those are at_most rows (at the last token of the budget only a stop token is admissible,
    and it must be there even when truncation dropped it), equal rows past their stop
    length (with no budget left the stop token, predicted 0, is the closest candidate) and
    equal rows whose last token ended a sentence (stopping there competes on length). It is
    invalid where a stop token is already a candidate, or where every stop token has
    probability 0 (banned by logit_bias or a grammar): then the row cannot stop here, and the
    output ends at its max_new_tokens (which admission caps at the target for at_most).
    """
    ids = stop_ids.clamp_min(0)  # [B, S]
    prob = torch.where(stop_ids >= 0, probs_of(ids), torch.full_like(ids, -1.0,
                                                                     dtype=torch.float32))
    best = prob.argmax(dim=1, keepdim=True)
    stop_id, stop_prob = ids.gather(1, best).view(-1), prob.gather(1, best).view(-1)
    is_stop = ((cand.ids.unsqueeze(-1) == stop_ids.unsqueeze(1)) & (stop_ids.unsqueeze(1) >= 0)
               ).any(-1)
    present = (is_stop & cand.valid).any(1)
    ok = rows & ~present & (stop_prob > 0)
    return Candidates(ids=torch.cat([cand.ids, stop_id.view(-1, 1)], dim=1),
                      base_prob=torch.cat([cand.base_prob, stop_prob.clamp_min(0).view(-1, 1)],
                                          dim=1),
                      valid=torch.cat([cand.valid, ok.view(-1, 1)], dim=1))


def _packed_positions(worker, state: LengthState, rows, cand: Candidates, R: int,
                      stop_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """The positions of the [B, 1 + K] star trees the forward computes: every root and each
    row's own candidate slots, so one request's top_k = 64 does not give every row a
    65-token tree, and a row that only reports values has none. None: all of them.

    Stop tokens are never computed: their value is 0 by definition (decide_from_values and
    the fused kernel set it whatever the forward gives). CPU: exactly the valid non-stop
    slots. GPU: each row's top_k slots (the appended stop slot left out), counted on the host
    and memoized per batch: no device sync.
    """
    if not worker.use_kernels:
        return _valid_positions(cand.valid & ~stop_mask(cand.ids, stop_ids), R)
    B, K = cand.ids.shape
    T = R + K

    def build():
        keep = []
        for b, i in enumerate(rows):
            cap = min(state.top_ks[i], state.num_candidates) if state.steer[i] else 0
            keep += [b * T + j for j in range(R + cap)]
        return keep

    def packed():
        keep = build()
        return None if len(keep) == B * T else state.memo_tensor(keep)  # None: all

    return state.memo(("packed", tuple(rows), R, K), packed)


def _valid_positions(valid: torch.Tensor, R: int) -> Optional[torch.Tensor]:
    """CPU path: the roots and the valid candidate slots (a device sync on a GPU)."""
    keep = torch.cat([torch.ones_like(valid[:, :R]), valid], 1).view(-1)
    if bool(keep.all()):
        return None
    if not bool(keep.any()):  # a prefill whose only candidates are stop tokens: one token
        keep[0] = True
    return keep.nonzero().view(-1)


def _drop_unused_slots(cand: Candidates) -> Candidates:
    """Keep only the candidate slots some row uses (CPU path).

    Every slot is a token of the LenVM forward, and on a CPU the forward's cost grows with its
    token count: with top-p / min-p and the plausibility floor most rows have far fewer than
    K candidates. Slots are sorted by base probability, so valid ones are mostly a prefix (a
    stop token below the floor stays valid); the slots past every row's last valid one go.
    The GPU path keeps K slots: finding the count would cost a device sync, and there the
    forward is bound by reading the prefix KV.
    """
    K = cand.ids.shape[1]
    last = (cand.valid * torch.arange(1, K + 1, device=cand.valid.device)).amax()
    used = max(int(last), 1)
    if used == cand.ids.shape[1]:
        return cand
    return Candidates(ids=cand.ids[:, :used], base_prob=cand.base_prob[:, :used],
                      valid=cand.valid[:, :used])


def _candidates(worker, row_logits, temps, st, sampling_info, index, K):
    """Candidates of the steering rows, and a lookup of any tokens' base probability
    (ids [B, S] -> probabilities [B, S])."""
    args = (row_logits, temps, st.top_k, sampling_info.top_ps[index],
            sampling_info.min_ps[index], K)
    if worker.use_kernels:
        from sglang_lenvm.kernels.candidates import select_candidates_triton

        tensors, lse = select_candidates_triton(*args, return_lse=True)
        cand = Candidates(*tensors)
    else:
        cand, lse = select_candidates(*args, return_lse=True)
    return cand, lambda ids: torch.exp(
        row_logits.float().gather(1, ids) / temps.float().view(-1, 1) - lse.view(-1, 1))


def _values_and_decision(worker, tokens, positions, meta, cand, st, generated, must_stop,
                         rids) -> HeadDecision:
    """One LenVM star forward, the value head and the decision (fused Triton on GPU)."""
    rule = worker.config.decision_rule()
    kw = dict(has_root=meta.has_root, mode=st.mode, target=st.target, generated=generated,
              beta=st.beta, greedy=st.greedy, gamma=worker.gamma, must_stop=must_stop)
    if worker.use_kernels:
        from sglang_lenvm.kernels.value_head_decision import value_head_decision_triton

        head = worker.model.v_head
        hidden = meta.unpack(worker.star_hidden(tokens, positions, meta))  # [B * T, H]
        faults.inject("decision", rids)
        return HeadDecision(*value_head_decision_triton(
            hidden, head.fc.weight, head.fc.bias, head.summary.weight, head.summary.bias,
            ids=cand.ids, base_prob=cand.base_prob, valid=cand.valid, closes=cand.closes,
            stop_ids=st.stop_ids,
            mode_codes=(MODE_EQUAL, MODE_AT_MOST, MODE_AT_LEAST),
            equal_ratio=equal_uses_ratio(rule.pop("equal_distance")), **rule, **kw))
    p_all = torch.sigmoid(worker.star(tokens, positions, meta))
    faults.inject("decision", rids)
    return decide_from_values(p_all, cand, st.stop_ids, **rule, **kw)


def _one_pass_decision(worker, hidden, p_state, cand, st, generated, must_stop, has_root,
                       rids) -> HeadDecision:
    """The candidates' values from the candidate head, then the same decision as the star
    path (on GPU too: the fused kernel reads star hidden states, which one-pass skips)."""
    p_cand = torch.sigmoid(worker.candidate_values(hidden.float(), cand.ids))
    p_all = torch.cat([p_state.float().view(-1, 1), p_cand], 1) if has_root else p_cand
    faults.inject("decision", rids)
    return decide_from_values(p_all, cand, st.stop_ids, has_root=has_root, mode=st.mode,
                              target=st.target, generated=generated, beta=st.beta,
                              greedy=st.greedy, gamma=worker.gamma, must_stop=must_stop,
                              **worker.config.decision_rule())


def _equal_stop_near(state: LengthState, forward_batch, rows) -> bool:
    """Could an equal row reach its stop length this step? From host copies: no device sync.

    One token of slack, in case the host's seq_lens lags the device's (overlap scheduling).
    """
    stop_at = state.equal_stop_seq_len_cpu[rows]
    seq_lens_cpu = forward_batch.seq_lens_cpu
    if seq_lens_cpu is None:
        return bool((stop_at < NEVER).any())
    return bool((seq_lens_cpu[rows].to(torch.int64) + 1 >= stop_at).any())


def _host_max(forward_batch, rows, R: int) -> int:
    """Largest KV prefix among the rows, from the host copy of seq_lens (no device sync)."""
    seq_lens_cpu = forward_batch.seq_lens_cpu
    if seq_lens_cpu is None:
        return int(forward_batch.seq_lens.max()) - R
    return int(seq_lens_cpu[rows].max()) - R


def _neutralize_truncation(sampling_info, rows: torch.Tensor, mask: torch.Tensor) -> None:
    """The sampler must draw from our distribution as is: no second top-k/top-p/min-p.

    `sampling_info` is the forward's own copy; its tensors are shared with the scheduler's,
    so they are replaced, never written in place.
    """
    full = torch.zeros_like(sampling_info.top_ps, dtype=torch.bool)
    full[rows] = mask
    sampling_info.top_ps = torch.where(full, torch.ones_like(sampling_info.top_ps),
                                       sampling_info.top_ps)
    sampling_info.min_ps = torch.where(full, torch.zeros_like(sampling_info.min_ps),
                                       sampling_info.min_ps)
    sampling_info.top_ks = torch.where(full, torch.full_like(sampling_info.top_ks, TOP_K_ALL),
                                       sampling_info.top_ks)
    sampling_info.max_top_k = None
