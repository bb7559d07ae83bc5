"""Candidate selection (top-k / top-p / min-p truncation) in Triton, two launches.

Reference: `sglang_lenvm.runtime.decision.select_candidates`. It materialises softmax(logits / T)
over the whole vocabulary (a float32 [B, V] write and re-read), then runs torch.topk, cumsum and a
handful of elementwise ops: about eight launches and three passes over B x V. Nothing in SGLang or
FlashInfer returns what we need: FlashInfer's top_k/top_p ops (`top_k_renorm_probs`,
`top_k_mask_logits`, `top_k_top_p_sampling_from_*`) renormalise or mask the full vocabulary or
draw a sample, but never hand back the k ids with their full-vocabulary probabilities, and
SGLang's sampler calls those. So this file reads the logits exactly once:

1. `_topk_partial_kernel`, grid (B, vocab chunks): for its chunk of a row, the online softmax
   statistics (max and sum of exp, float32) and the chunk's K_PAD largest scaled logits with
   their ids. The running top list is kept in registers; a tile only costs extra work for its
   values above the current K_PAD-th best (an insertion loop), rare after a chunk's first
   tile. Chunks split the vocabulary so that small batches still fill the GPU.
2. `_topk_merge_kernel`, grid (B,): merges the chunks' statistics into the row's log-sum-exp,
   extracts the global top K in descending order (as torch.topk, sorted=True), turns them into
   probabilities exp(x - lse), and applies the truncation rules exactly as select_candidates:
   rank < top_k, mass before < top_p (cumsum - p, as the reference computes it), p >= min_p *
   p_max, p > 0, and slot 0 always kept when it has mass.

The row's log-sum-exp is returned too (`return_lse=True`): the scorer needs the full-vocabulary
probability of each row's stop token for at_most rows, which would otherwise cost a second
softmax over [B, V]; with the lse it is exp(logit / T - lse) for one gathered logit per row.

Slots past the last finite logit (fewer than K tokens left by a grammar mask) get base_prob 0,
valid False and id 0, where torch.topk would put arbitrary zero-probability ids; equal scaled
logits may come out in a different order than torch.topk's (which is itself unspecified).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl



class CandidateTensors(NamedTuple):
    """The fields of the runtime's `Candidates` (this module is a leaf: no runtime import)."""

    ids: torch.Tensor  # [B, K] int64 token ids, by descending base probability
    base_prob: torch.Tensor  # [B, K] float32 base probability (after temperature, full vocab)
    valid: torch.Tensor  # [B, K] bool: inside the row's top-k / top-p / min-p truncation

TARGET_PROGRAMS = 264  # ~2 per SM of an H100; untuned
MIN_CHUNK = 4096
MAX_BLOCK = 1024


@triton.jit
def _topk_partial_kernel(
    LOGITS, TEMP, PART_V, PART_I, PART_M, PART_S,
    vocab, chunk, num_chunks, stride_l, stride_t,
    K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.program_id(1)
    temp = tl.load(TEMP + row * stride_t).to(tl.float32)
    start = c * chunk
    end = tl.minimum(start + chunk, vocab)
    slots = tl.arange(0, K_PAD)
    offs = tl.arange(0, BLOCK)
    top_v = tl.full([K_PAD], float("-inf"), tl.float32)
    top_i = tl.zeros([K_PAD], tl.int32)
    m = float("-inf")
    s = 0.0
    for n0 in range(start, end, BLOCK):
        idx = n0 + offs
        ok = idx < end
        x = tl.load(LOGITS + row.to(tl.int64) * stride_l + idx, mask=ok, other=float("-inf"))
        x = x.to(tl.float32) / temp  # the reference's logits.float() / temperature
        # Online softmax statistics; a tile (or chunk) of -inf only must not make NaNs.
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
        m = m_new
        # Top list: only the tile's values above the current K_PAD-th best can enter, and at
        # most K_PAD of them; insert the tile's maximum (replacing the list's minimum) that many
        # times. Usually zero iterations after a chunk's first tile.
        n_above = tl.sum((x > tl.min(top_v, 0)).to(tl.int32), 0)
        cur = x
        for _ in range(0, tl.minimum(n_above, K_PAD)):
            v = tl.max(cur, 0)
            best = tl.argmax(cur, 0, tie_break_left=True)
            at = tl.argmin(top_v, 0, tie_break_left=True)
            take = (slots == at) & (top_v < v)  # top_v[at] is the minimum
            top_v = tl.where(take, v, top_v)
            top_i = tl.where(take, n0 + best, top_i)
            cur = tl.where(offs == best, float("-inf"), cur)
    part = row * num_chunks + c
    tl.store(PART_V + part * K_PAD + slots, top_v)
    tl.store(PART_I + part * K_PAD + slots, top_i)
    tl.store(PART_M + part, m)
    tl.store(PART_S + part, s)


@triton.jit
def _topk_merge_kernel(
    PART_V, PART_I, PART_M, PART_S, TOP_K, TOP_P, MIN_P, IDS, BASE, VALID, LSE,
    num_chunks, k, stride_ids, stride_base, stride_valid,
    K_PAD: tl.constexpr, K_OUT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    # Row log-sum-exp from the chunk statistics.
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < num_chunks
    pm = tl.load(PART_M + row * num_chunks + offs_c, mask=c_ok, other=float("-inf"))
    ps = tl.load(PART_S + row * num_chunks + offs_c, mask=c_ok, other=0.0)
    mx = tl.max(pm, 0)
    mx_ref = tl.where(mx == float("-inf"), 0.0, mx)
    z = tl.sum(ps * tl.exp(pm - mx_ref), 0)
    lse = mx_ref + tl.log(z)
    tl.store(LSE + row, lse)

    # Global top k, descending, from the chunks' top lists.
    flat = tl.arange(0, BLOCK_C * K_PAD)
    f_ok = flat < num_chunks * K_PAD
    cand_v = tl.load(PART_V + row * num_chunks * K_PAD + flat, mask=f_ok, other=float("-inf"))
    cand_i = tl.load(PART_I + row * num_chunks * K_PAD + flat, mask=f_ok, other=0)
    slots = tl.arange(0, K_OUT)
    out_v = tl.full([K_OUT], float("-inf"), tl.float32)
    out_i = tl.zeros([K_OUT], tl.int32)
    for j in range(0, k):
        best = tl.argmax(cand_v, 0, tie_break_left=True)
        out_v = tl.where(slots == j, tl.max(cand_v, 0), out_v)
        out_i = tl.where(slots == j, tl.sum(tl.where(flat == best, cand_i, 0), 0), out_i)
        cand_v = tl.where(flat == best, float("-inf"), cand_v)
    prob = tl.exp(out_v - lse)  # -inf slots -> 0
    out_i = tl.where(prob > 0, out_i, 0)

    # Truncation, as select_candidates computes it.
    k_ok = slots < k
    p0 = tl.max(prob, 0)  # slot 0 holds the largest
    mass_before = tl.cumsum(prob, 0) - prob
    valid = slots < tl.load(TOP_K + row)
    valid &= mass_before < tl.load(TOP_P + row).to(tl.float32)
    valid &= prob >= p0 * tl.load(MIN_P + row).to(tl.float32)
    valid &= prob > 0
    valid |= (slots == 0) & (prob > 0)  # slot 0 holds p0
    tl.store(IDS + row * stride_ids + slots, out_i.to(tl.int64), mask=k_ok)
    tl.store(BASE + row * stride_base + slots, prob, mask=k_ok)
    tl.store(VALID + row * stride_valid + slots, valid, mask=k_ok)


def select_candidates_triton(logits: torch.Tensor, temperature: torch.Tensor,
                             top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                             k_max: int, *, return_lse: bool = False):
    """Same contract as `select_candidates`; with return_lse also the row log-sum-exp [B]."""
    B, V = logits.shape
    k = min(k_max, V)
    dev = logits.device
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    temperature = temperature.reshape(-1)
    top_k, top_p, min_p = top_k.contiguous(), top_p.contiguous(), min_p.contiguous()
    ids = torch.empty((B, k), dtype=torch.int64, device=dev)
    base = torch.empty((B, k), dtype=torch.float32, device=dev)
    valid = torch.empty((B, k), dtype=torch.bool, device=dev)
    lse = torch.empty((B,), dtype=torch.float32, device=dev)
    if B == 0 or k == 0:
        cand = CandidateTensors(ids=ids, base_prob=base, valid=valid)
        return (cand, lse) if return_lse else cand

    # Vocabulary chunks: enough programs to fill the GPU, chunks of at least MIN_CHUNK.
    chunks = max(1, min(triton.cdiv(TARGET_PROGRAMS, B), triton.cdiv(V, MIN_CHUNK)))
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(triton.cdiv(V, chunks))))
    chunk = triton.cdiv(triton.cdiv(V, chunks), block) * block
    chunks = triton.cdiv(V, chunk)
    k_pad = max(2, triton.next_power_of_2(k))
    part_v = torch.empty((B, chunks, k_pad), dtype=torch.float32, device=dev)
    part_i = torch.empty((B, chunks, k_pad), dtype=torch.int32, device=dev)
    part_m = torch.empty((B, chunks), dtype=torch.float32, device=dev)
    part_s = torch.empty((B, chunks), dtype=torch.float32, device=dev)
    _topk_partial_kernel[(B, chunks)](
        logits, temperature, part_v, part_i, part_m, part_s,
        V, chunk, chunks, logits.stride(0), temperature.stride(0),
        K_PAD=k_pad, BLOCK=block, num_warps=4,
    )
    _topk_merge_kernel[(B,)](
        part_v, part_i, part_m, part_s, top_k, top_p, min_p, ids, base, valid, lse,
        chunks, k, ids.stride(0), base.stride(0), valid.stride(0),
        K_PAD=k_pad, K_OUT=k_pad, BLOCK_C=max(2, triton.next_power_of_2(chunks)), num_warps=4,
    )
    cand = CandidateTensors(ids=ids, base_prob=base, valid=valid)
    return (cand, lse) if return_lse else cand
