"""The Triton star-tree attention kernel vs the torch reference (star_attention_torch).

Triton reads TRITON_INTERPRET when a kernel is decorated, so the CPU checks must run in a process
where it was set from the start: without a GPU, `test_interpreter_subprocess` reruns this file
in a child pytest with TRITON_INTERPRET=1, where the checks below run on CPU tensors. With a CUDA
device (and no TRITON_INTERPRET) they run compiled, on the GPU, in this process.
"""

import math

import pytest
import torch
from interpreter import DEVICE, needs_device, not_in_child, run_in_interpreter


@not_in_child
def test_interpreter_subprocess():
    run_in_interpreter(__file__)


def _case(B, K, hq, hkv, d, prefix, has_root, dtype, seed=0, fused_qkv=False):
    """Random star trees over a shuffled slot table; returns the kernel args."""
    from sglang_lenvm.runtime.star_attention import StarMeta

    g = torch.Generator().manual_seed(seed)
    T = K + int(has_root)
    max_ctx = max(prefix) + 4
    slots = B * max_ctx + 8
    req_to_token = torch.zeros(B + 3, max_ctx, dtype=torch.int32)
    perm = torch.randperm(slots, generator=g).int()
    pool_rows = torch.randperm(B + 3, generator=g)[:B]  # requests live in arbitrary pool rows
    for b in range(B):
        req_to_token[pool_rows[b]] = perm[b * max_ctx:(b + 1) * max_ctx]
    prefix_lens = torch.tensor(prefix)
    meta = StarMeta(req_pool_indices=pool_rows, prefix_lens=prefix_lens,
                    max_prefix_len=int(prefix_lens.max()), tree_size=T, has_root=has_root,
                    root_slots=None)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    if fused_qkv:  # k/v as strided views of one projection output, as in the model
        qkv = rnd(B * T, (hq + 2 * hkv) * d)
        q = qkv[:, :hq * d].view(B * T, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(B * T, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(B * T, hkv, d)
    else:
        q, k, v = rnd(B * T, hq, d), rnd(B * T, hkv, d), rnd(B * T, hkv, d)
    kc, vc = rnd(slots, hkv, d), rnd(slots, hkv, d)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    meta.req_pool_indices, meta.prefix_lens = dev(meta.req_pool_indices), dev(meta.prefix_lens)
    return [dev(x) for x in (q, k, v, kc, vc, req_to_token)] + [meta, 1 / math.sqrt(d)]


def _check(args, atol, num_splits=None):
    from sglang_lenvm.kernels.star_attention import star_attention_triton
    from sglang_lenvm.runtime.star_attention import star_attention_torch

    q, k, v, kc, vc, r2t, meta, scale = args
    got = star_attention_triton(q, k, v, kc, vc, r2t, meta, scale, num_splits=num_splits)
    assert got.shape == (q.shape[0], q.shape[1], v.shape[2]) and got.dtype == q.dtype
    # reference in float32 on the same (rounded) inputs
    f = [x.float() for x in (q, k, v, kc, vc)]
    want = star_attention_torch(*f, r2t, meta, scale)
    err = (got.float() - want).abs().max().item()
    assert err < atol, err
    if meta.tree_size > 2:  # the candidates really differ: not trivially passing
        assert (got[1] - got[2]).abs().max() > 1e-2
    return got


@needs_device
@pytest.mark.parametrize("splits", [None, 3])
def test_fp32_gqa_ragged_with_empty_prefix(splits):
    # ragged prefixes incl. 0; with 3 splits the 0 and 7 prefixes leave splits with no key
    args = _case(B=3, K=5, hq=4, hkv=2, d=32, prefix=[0, 7, 70], has_root=True,
                 dtype=torch.float32, fused_qkv=True)
    _check(args, atol=2e-5, num_splits=splits)


@needs_device
def test_fp32_prefill_tree_k1_mha_head_dim_64():
    # no root (prefill-time tree), one candidate per request, MHA
    args = _case(B=3, K=1, hq=2, hkv=2, d=64, prefix=[5, 0, 33], has_root=False,
                 dtype=torch.float32, seed=1)
    _check(args, atol=2e-5, num_splits=2)


@needs_device
def test_fp32_group_7_and_two_row_blocks():
    # GQA 7 (Qwen2.5-7B) and T * group = 147 query rows > 128: two m-blocks
    args = _case(B=2, K=20, hq=7, hkv=1, d=16, prefix=[9, 40], has_root=True,
                 dtype=torch.float32, seed=2)
    _check(args, atol=2e-5, num_splits=2)


@needs_device
@pytest.mark.parametrize("splits", [None, 2])
def test_bf16_qwen_1_5b_heads(splits):
    # Qwen2.5-1.5B attention shape: 12 q heads, 2 kv heads, head dim 128; K = 15
    args = _case(B=2, K=15, hq=12, hkv=2, d=128, prefix=[40, 3], has_root=True,
                 dtype=torch.bfloat16, seed=3)
    got = _check(args, atol=3e-2, num_splits=splits)
    from sglang_lenvm.runtime.star_attention import star_attention_torch

    bf16_ref = star_attention_torch(*args)  # torch's own bfloat16 result: same error scale
    assert (got.float() - bf16_ref.float()).abs().max() < 3e-2


@needs_device
def test_fp16_group_8():
    args = _case(B=2, K=3, hq=8, hkv=1, d=64, prefix=[70, 1], has_root=True,
                 dtype=torch.float16, seed=4)
    _check(args, atol=3e-3, num_splits=2)


def test_plan_splits_trades_waves_against_partials():
    from sglang_lenvm.kernels.star_attention import plan_splits

    cpu = torch.device("cpu")  # 132 SMs (an H100) assumed off-GPU
    # Qwen2.5-1.5B at K = 15: 96 query rows per program, bf16 K+V of 512 bytes per token
    kw = dict(partial_bytes=2 * 96 * 128 * 4, kv_bytes_per_token=512, ctas_per_sm=1, device=cpu)
    assert plan_splits(0, 64, **kw) == 1
    assert plan_splits(200, 1, **kw) == 1  # shorter than one split
    assert plan_splits(4096, 64, **kw) == 2  # batch 32: 128 programs, one full wave
    assert plan_splits(4096, 2, **kw) == 16  # batch 1: as many 256-token splits as allowed
    assert plan_splits(16384, 16, **kw) == 8  # batch 8: 128 programs
    assert plan_splits(16384, 128, **kw) == 1  # batch 64 fills the GPU on its own
