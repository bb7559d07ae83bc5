"""Star-tree candidate attention in Triton: each request's prefix KV is read once for all queries.

Semantics are exactly `sglang_lenvm.runtime.star_attention.star_attention_torch` (the reference):
per request b with tree size T (= has_root + K), query row t attends to the P_b cached prefix
tokens (slots `req_to_token[req_pool_indices[b], :P_b]`), to the root (tree row 0, when there is
a root and t > 0) and to itself.

Design
- Kernel 1 (`_star_fwd`), grid (B * Hkv, m-blocks, splits). One program owns one request, one KV
  head and one slice of the prefix. Its query rows are all T tree tokens x the GQA group of that
  KV head (row = t * group + g), so every prefix K/V tile it gathers through `req_to_token` feeds
  all T * group queries with one tensor-core dot: the prefix is read once per request and KV head,
  not once per candidate. T * group is 96 for a Qwen2.5-1.5B LenVM at K = 15, so the dots are
  well shaped; rows beyond 128 (64 in float32) go to a second m-block, which re-reads the prefix.
- Long prefixes are split over programs (split-K, "flash decoding") so that small batches still
  fill the GPU; how many splits comes from a small cost model (`plan_splits`) that weighs wave
  quantisation against the extra traffic of the partials. Each split keeps an online softmax
  (exp2 domain) and writes its normalised partial output plus log-sum-exp; kernel 2
  (`_star_merge`, grid (B*T, Hq)) merges the splits. With one split (large batches / short
  prefixes) kernel 1 writes the final output and kernel 2 is skipped.
- The tree keys (the root's and the row's own K/V, which are not in the cache) are folded into
  the online softmax of split 0 before its prefix loop. They differ per query row, so they are
  row-wise dot products (a [rows, D] gather of the tree K/V), not a matmul.
- Numerics: scores, softmax and accumulators in float32; the P @ V dot takes P in the V dtype
  (as flash attention does); float32 inputs use IEEE dots (no TF32) to match torch.

Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests) multiplies bfloat16 dot operands
as raw uint16 bit patterns, so under the interpreter bfloat16 operands are widened to float32
before `tl.dot` (bf16 x bf16 products are exact in float32, so this does not change the result
beyond accumulation order). Compiled kernels keep the bfloat16 tensor-core path.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Split heuristic (host side, from the host-known max prefix: no device sync). A split costs
# its share of the prefix K/V plus a float32 partial of (rows x Dv) written and read back by the
# merge; programs run in waves of (SMs x CTAs per SM). `plan_splits` picks the split count with
# the least modelled time (waves x bytes per program). Untuned on hardware:
# `benchmarks.bench_kernels --kernels tune` measures the alternatives.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64
MAX_BLOCK_M = 128
_DEFAULT_SMS = 132  # H100 SXM; only used when there is no CUDA device (the interpreter)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


@triton.jit
def _star_fwd(
    Q, K, V, KC, VC, REQ_TO_TOKEN, REQ_IDX, PREFIX_LENS, O, MID_O, MID_LSE,
    qk_scale,  # softmax scale * log2(e): scores live in the exp2 domain
    num_kv_heads, tree_size, chunk,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcs, stride_kch, stride_vcs, stride_vch, stride_r2t,
    stride_ot, stride_oh, stride_mt, stride_mh, stride_ms, stride_lt, stride_lh,
    GROUP: tl.constexpr, HAS_ROOT: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    kvh = pid % num_kv_heads
    split = tl.program_id(2)

    # Query rows of this program: tree token t, GQA member g -> query head kvh * GROUP + g.
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tree_size * GROUP
    t = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    tok = (b * tree_size + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_dot = q.to(tl.float32) if UPCAST_DOT else q

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    if split == 0:
        # The tree keys: each row's own token, plus the root for candidate rows (t > 0). For the
        # root row itself (t = 0) its own key is the root: counted once.
        qf = q.to(tl.float32)
        own_k = tl.load(K + tok[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        own_v = tl.load(V + tok[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :],
                        mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        s_own = tl.sum(qf * own_k, 1) * qk_scale
        if HAS_ROOT:
            root = (b * tree_size).to(tl.int64)
            root_k = tl.load(K + root * stride_kt + kvh * stride_kh + offs_d, mask=d_ok,
                             other=0.0).to(tl.float32)
            root_v = tl.load(V + root * stride_vt + kvh * stride_vh + offs_dv, mask=dv_ok,
                             other=0.0).to(tl.float32)
            s_root = tl.where(t > 0, tl.sum(qf * root_k[None, :], 1) * qk_scale, float("-inf"))
            m_i = tl.maximum(s_own, s_root)
            p_own = tl.exp2(s_own - m_i)
            p_root = tl.exp2(s_root - m_i)
            l_i = p_own + p_root
            acc = p_own[:, None] * own_v + p_root[:, None] * root_v[None, :]
        else:
            m_i = s_own
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
            acc = own_v

    # This program's slice of the request's prefix. Every tile of the loop has at least one
    # valid key, so m_i is finite after the first tile even when it starts at -inf.
    prefix_len = tl.load(PREFIX_LENS + b).to(tl.int32)
    req = tl.load(REQ_IDX + b).to(tl.int64)
    start = split * chunk
    end = tl.minimum(start + chunk, prefix_len)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        slot = tl.load(REQ_TO_TOKEN + req * stride_r2t + offs_n, mask=n_ok, other=0).to(tl.int64)
        kt = tl.load(KC + slot[None, :] * stride_kcs + kvh * stride_kch + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0).to(Q.dtype.element_ty)
        if UPCAST_DOT:
            kt = kt.to(tl.float32)
        s = tl.dot(q_dot, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VC + slot[:, None] * stride_vcs + kvh * stride_vch + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(Q.dtype.element_ty)
        p = p.to(v.dtype)  # flash-attention style: P in the value dtype for the tensor-core dot
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        tl.store(O + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    else:
        # A split past a short request's prefix saw no key: lse = -inf, weight 0 in the merge.
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(MID_O + tok[:, None] * stride_mt + head[:, None] * stride_mh + split * stride_ms
                 + offs_dv[None, :], out, mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(MID_LSE + tok * stride_lt + head * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _star_merge(
    MID_O, MID_LSE, O, num_splits,
    stride_mt, stride_mh, stride_ms, stride_lt, stride_lh, stride_ot, stride_oh,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < num_splits
    lse = tl.load(MID_LSE + tok * stride_lt + head * stride_lh + offs_s, mask=s_ok,
                  other=float("-inf"))
    # Split 0 always holds the tree keys, so the max is finite.
    w = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(MID_O + tok * stride_mt + head * stride_mh + offs_s[:, None] * stride_ms
                + offs_dv[None, :], mask=s_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(O + tok * stride_ot + head * stride_oh + offs_dv, out.to(O.dtype.element_ty),
             mask=offs_dv < DV)


def plan_splits(max_prefix_len: int, programs: int, partial_bytes: int, kv_bytes_per_token: int,
                ctas_per_sm: int, device: torch.device) -> int:
    """Prefix splits per (request, KV head, row block) program, by a small cost model."""
    if max_prefix_len <= 0:
        return 1
    slots = _sm_count(device) * ctas_per_sm
    best_cost, best = None, 1
    for splits in range(1, min(MAX_SPLITS, triton.cdiv(max_prefix_len, MIN_SPLIT_TOKENS)) + 1):
        waves = triton.cdiv(programs * splits, slots)
        per_program = (triton.cdiv(max_prefix_len, splits) * kv_bytes_per_token
                       + (partial_bytes if splits > 1 else 0))
        if best_cost is None or waves * per_program < best_cost:
            best_cost, best = waves * per_program, splits
    return best


@functools.lru_cache(maxsize=256)  # every layer of a forward asks the same: plan it once
def launch_plan(batch: int, tree_size: int, hq: int, hkv: int, d: int, dv: int,
                max_prefix_len: int, dtype: torch.dtype, device: torch.device, *,
                num_splits: Optional[int] = None,
                block_n: Optional[int] = None, num_warps: Optional[int] = None,
                num_stages: Optional[int] = None) -> dict:
    """Tile sizes, splits and warps for one call (host ints only: no device sync). The dict
    is shared between calls (cached): read it, do not change it."""
    rows = tree_size * (hq // hkv)
    fp32 = dtype == torch.float32
    # float32 (IEEE FMA dots, no tensor cores) keeps its tiles in registers: smaller tiles
    block_m = max(16, min(MAX_BLOCK_M // 2 if fp32 else MAX_BLOCK_M,
                          triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    block_n = block_n or (16 if fp32 else 64)
    if not num_splits:
        # 128-row blocks hold ~155 registers x 256 threads: one CTA per SM; smaller ones fit two
        num_splits = plan_splits(
            max_prefix_len, batch * hkv * m_blocks,
            partial_bytes=2 * min(rows, block_m) * dv * 4,
            kv_bytes_per_token=(d + dv) * dtype.itemsize,
            ctas_per_sm=1 if block_m >= 128 else 2, device=device)
    splits = num_splits
    chunk = triton.cdiv(triton.cdiv(max(max_prefix_len, 1), splits), block_n) * block_n
    return dict(block_m=block_m, m_blocks=m_blocks, block_n=block_n, chunk=chunk,
                splits=max(1, triton.cdiv(max_prefix_len, chunk)),
                num_warps=num_warps or (8 if block_m >= 128 or fp32 else 4),
                num_stages=num_stages or 2)


def star_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          req_to_token: torch.Tensor, meta, scale: float,
                          **overrides) -> torch.Tensor:
    """q [B*T, Hq, D], k/v [B*T, Hkv, D(v)]; caches [slots, Hkv, D(v)]. Returns [B*T, Hq, Dv].

    Same contract as `star_attention_torch`. `overrides` (num_splits, block_n, num_warps,
    num_stages) replace the launch heuristics, for tuning with benchmarks/bench_kernels.py.
    Only the last dimension of each tensor needs to be contiguous.
    """
    B, T = meta.prefix_lens.shape[0], meta.tree_size
    hq, d = q.shape[1], q.shape[2]
    hkv, dv = k.shape[1], v.shape[2]
    assert q.shape[0] == B * T and k.shape[0] == B * T and hq % hkv == 0, (q.shape, k.shape, B, T)
    q, k, v, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous()
                                 for x in (q, k, v, k_cache, v_cache))
    out = torch.empty((B * T, hq, dv), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    plan = launch_plan(B, T, hq, hkv, d, dv, int(meta.max_prefix_len), q.dtype, q.device,
                       **overrides)
    splits = plan["splits"]
    if splits > 1:
        mid_o = torch.empty((B * T, hq, splits, dv), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((B * T, hq, splits), dtype=torch.float32, device=q.device)
    else:  # unused by the single-split kernel: pass `out` for the pointers
        mid_o, mid_lse = out.unsqueeze(2), out[:, :, 0]

    _star_fwd[(B * hkv, plan["m_blocks"], splits)](
        q, k, v, k_cache, v_cache, req_to_token, meta.req_pool_indices.contiguous(),
        meta.prefix_lens.contiguous(),
        out, mid_o, mid_lse,
        scale * LOG2E, hkv, T, plan["chunk"],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        req_to_token.stride(0),
        out.stride(0), out.stride(1), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        GROUP=hq // hkv, HAS_ROOT=bool(meta.has_root), SINGLE_SPLIT=splits == 1,
        D=d, DV=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_M=plan["block_m"],
        BLOCK_N=plan["block_n"],
        UPCAST_DOT=_interpreting() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    if splits > 1:
        _star_merge[(B * T, hq)](
            mid_o, mid_lse, out, splits,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
            mid_lse.stride(1), out.stride(0), out.stride(1),
            DV=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)),
            BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4,
        )
    return out
