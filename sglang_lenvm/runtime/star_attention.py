"""Star-tree attention: score every candidate next token of every request in one forward.

Per request the tree is [root] + K candidates (the root only in decode steps). The root is the
request's last input token at position P (P = tokens already in the LenVM KV cache); it sees the
cached prefix and itself, and its K/V is written to the request's own KV slot, which keeps the
LenVM cache a mirror of the base model's. Candidate j sits at the next position and sees the
prefix, the root and itself only; its K/V is never written anywhere (the chosen token becomes
next step's root).

`star_attention_torch` is the CPU implementation and the reference for the Triton kernel in
`sglang_lenvm.kernels.star_attention`; `StarAttentionBackend` plugs either into SGLang's
`RadixAttention` layers through a ForwardContext of our own.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc


@dataclasses.dataclass
class StarMeta:
    req_pool_indices: torch.Tensor  # [B]
    prefix_lens: torch.Tensor  # [B] tokens already in the KV cache before the tree
    max_prefix_len: int  # host-side max of prefix_lens
    tree_size: int  # T = has_root + K
    has_root: bool
    root_slots: Optional[torch.Tensor]  # [B] KV slots the roots are written to (decode)
    # Packed trees: the positions of [B * T] the forward computes (the roots and each row's
    # own candidate slots), in order; None: all B * T. The model's layers run over the packed
    # tokens only; attention places them in the [B, T] layout and takes them back.
    packed: Optional[torch.Tensor] = None
    # The plan every layer shares (made by the first layer that asks, once per forward).
    _plan: Optional[tuple] = dataclasses.field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        B = self.prefix_lens.shape[0]
        return B * self.tree_size if self.packed is None else self.packed.shape[0]

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[num_tokens, ...] -> [B * T, ...], `fill` at the positions not computed."""
        if self.packed is None:
            return x
        B = self.prefix_lens.shape[0]
        out = x.new_full((B * self.tree_size, *x.shape[1:]), fill)
        out[self.packed] = x
        return out

    def plan(self, req_to_token: torch.Tensor) -> tuple:
        """(prefix KV slots [B, P] int64, live [B, P] bool, root rows [B] or None)."""
        if self._plan is None or self._plan[0] is not req_to_token:
            B, P = self.prefix_lens.shape[0], self.max_prefix_len
            device = self.prefix_lens.device
            idx = req_to_token[self.req_pool_indices, :P].long()
            live = torch.arange(P, device=device).view(1, P) < self.prefix_lens.view(B, 1)
            roots = torch.arange(B, device=device) * self.tree_size if self.has_root else None
            self._plan = (req_to_token, (idx, live, roots))
        return self._plan[1]


def star_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor,
                         req_to_token: torch.Tensor, meta: StarMeta,
                         scale: float) -> torch.Tensor:
    """q [B*T, Hq, D], k/v [B*T, Hkv, D]; caches [slots, Hkv, D]. Returns [B*T, Hq, Dv].

    Each query's keys are spelled out: the prefix (read once per request for all T queries and
    the GQA group), the root, and itself. No mask over the other candidates: a masked score
    added to a NaN (a broken candidate) would still be NaN and poison its neighbours.
    """
    B, T = meta.prefix_lens.shape[0], meta.tree_size
    hq, d = q.shape[1], q.shape[2]
    hkv, dv = k.shape[1], v.shape[-1]
    G, P = hq // hkv, meta.max_prefix_len
    qh = q.view(B, T, hkv, G, d).float()
    kt = k.view(B, T, hkv, d).float()
    vt = v.view(B, T, hkv, dv).float()

    idx, live, _ = meta.plan(req_to_token)  # [B, P] slots and which of them are the prefix
    # Rows shorter than P gather stale slots past their prefix: zero them (0 x NaN is NaN).
    pk = torch.where(live.view(B, P, 1, 1), k_cache[idx].float(), 0.0)  # [B, P, Hkv, D]
    pv = torch.where(live.view(B, P, 1, 1), v_cache[idx].float(), 0.0)
    s_prefix = torch.einsum("bthgd,bphd->bthgp", qh, pk) * scale
    s_prefix = torch.where(live.view(B, 1, 1, 1, P), s_prefix, float("-inf"))
    s_self = (qh * kt.unsqueeze(3)).sum(-1, keepdim=True) * scale  # [B, T, Hkv, G, 1]
    scores = [s_prefix]
    if meta.has_root:
        s_root = torch.einsum("bthgd,bhd->bthg", qh, kt[:, 0]).unsqueeze(-1) * scale
        s_root[:, 0] = float("-inf")  # the root query's own key is its self term
        scores.append(s_root)
    scores.append(s_self)
    w = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    out = torch.einsum("bthgp,bphd->bthgd", w[..., :P], pv)
    if meta.has_root:
        out = out + w[..., P:P + 1] * vt[:, 0].view(B, 1, hkv, 1, dv)
    out = out + w[..., -1:] * vt.unsqueeze(3)
    return out.reshape(B * T, hq, dv).to(q.dtype)


class StarAttentionBackend(AttentionBackend):
    """Attention backend for the LenVM's star-tree forwards (set `meta` before each forward)."""

    def __init__(self, token_to_kv_pool, req_to_token_pool, use_triton: bool = False):
        super().__init__()
        self.token_to_kv_pool = token_to_kv_pool
        self.req_to_token_pool = req_to_token_pool
        self.meta: Optional[StarMeta] = None
        self.kernel = None
        if use_triton:
            from sglang_lenvm.kernels.star_attention import star_attention_triton

            self.kernel = star_attention_triton

    def init_forward_metadata(self, forward_batch):
        pass

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        meta = self.meta
        # Packed trees: zeros at the positions not computed (finite, so no NaN can reach a
        # computed query; their outputs are dropped).
        k = meta.unpack(k.view(-1, layer.tp_k_head_num, layer.qk_head_dim))
        v = meta.unpack(v.view(-1, layer.tp_v_head_num, layer.v_head_dim))
        if meta.has_root:
            root = meta.plan(self.req_to_token_pool.req_to_token)[2]
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(meta.root_slots, None), k[root], v[root])
        q = meta.unpack(q.view(-1, layer.tp_q_head_num, layer.qk_head_dim))
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        fn = self.kernel or star_attention_torch
        o = fn(q, k, v, k_cache, v_cache, self.req_to_token_pool.req_to_token, meta, layer.scaling)
        if meta.packed is not None:
            o = o[meta.packed]
        return o.reshape(o.shape[0], layer.tp_q_head_num * layer.v_head_dim)

    forward_decode = forward_extend
