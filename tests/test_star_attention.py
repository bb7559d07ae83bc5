"""The torch star-tree attention vs a per-query reference over explicit key lists."""

import math

import pytest
import torch

from sglang_lenvm.runtime.star_attention import StarMeta, star_attention_torch


def naive(q, k, v, k_cache, v_cache, req_to_token, meta, scale):
    B, T = meta.prefix_lens.shape[0], meta.tree_size
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    out = torch.empty(q.shape[0], hq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        P = int(meta.prefix_lens[b])
        slots = req_to_token[meta.req_pool_indices[b], :P].long()
        for i in range(T):
            row = b * T + i
            keys = [k_cache[slots]]
            vals = [v_cache[slots]]
            if meta.has_root and i > 0:
                keys.append(k[b * T].unsqueeze(0))
                vals.append(v[b * T].unsqueeze(0))
            keys.append(k[row].unsqueeze(0))
            vals.append(v[row].unsqueeze(0))
            K = torch.cat(keys).double()
            V = torch.cat(vals).double()
            for h in range(hq):
                s = (K[:, h // group] @ q[row, h].double()) * scale
                out[row, h] = torch.softmax(s, 0) @ V[:, h // group]
    return out


@pytest.mark.parametrize("has_root", [True, False])
@pytest.mark.parametrize("K,hq,hkv", [(1, 4, 4), (5, 4, 2), (15, 8, 1)])
def test_star_matches_reference(has_root, K, hq, hkv):
    torch.manual_seed(0)
    d, slots_total, B = 16, 200, 4
    prefix = torch.tensor([0, 7, 31, 3])  # ragged, including an empty prefix
    T = K + int(has_root)
    req_to_token = torch.zeros(8, 64, dtype=torch.int32)
    perm = torch.randperm(slots_total)
    for b in range(B):
        req_to_token[b + 2, :40] = perm[b * 40:(b + 1) * 40].int()
    meta = StarMeta(req_pool_indices=torch.arange(B) + 2, prefix_lens=prefix,
                    max_prefix_len=int(prefix.max()), tree_size=T, has_root=has_root,
                    root_slots=None)
    q = torch.randn(B * T, hq, d)
    k = torch.randn(B * T, hkv, d)
    v = torch.randn(B * T, hkv, d)
    kc = torch.randn(slots_total, hkv, d)
    vc = torch.randn(slots_total, hkv, d)
    scale = 1 / math.sqrt(d)
    got = star_attention_torch(q, k, v, kc, vc, req_to_token, meta, scale)
    want = naive(q, k, v, kc, vc, req_to_token, meta, scale)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()
    # candidates differ from each other: the test is not trivially passing
    assert (got[1] - got[2]).abs().max() > 1e-3


def test_stale_nan_slots_past_a_prefix_do_not_leak():
    """Rows with a shorter prefix gather slots past it (padding); NaN there must not leak."""
    torch.manual_seed(1)
    d, hkv, hq = 8, 1, 2
    req_to_token = torch.arange(64, dtype=torch.int32).view(2, 32)
    kc = torch.randn(64, hkv, d)
    vc = torch.randn(64, hkv, d)
    kc[5:32] = float("nan")  # row 0's prefix is slots 0..4; the rest belongs to no one
    vc[5:32] = float("inf")
    meta = StarMeta(req_pool_indices=torch.tensor([0, 1]), prefix_lens=torch.tensor([5, 20]),
                    max_prefix_len=20, tree_size=3, has_root=True, root_slots=None)
    q, k, v = torch.randn(6, hq, d), torch.randn(6, hkv, d), torch.randn(6, hkv, d)
    out = star_attention_torch(q, k, v, kc, vc, req_to_token, meta, 0.3)
    assert torch.isfinite(out).all()
    want = naive(q, k, v, kc, vc, req_to_token, meta, 0.3)
    assert torch.allclose(out.double(), want, atol=1e-5)
