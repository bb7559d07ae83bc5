"""Benchmark of the Triton kernels (issue 4) against their torch references, on one GPU.

    python -m benchmarks.bench_kernels [--out results.json]     # needs an NVIDIA GPU
    python -m benchmarks.bench_kernels --smoke                   # CPU, Triton interpreter

For each kernel and shape: median time (triton.testing.do_bench: L2 flushed between runs), the
achieved memory bandwidth (bytes the operation must move / time; the split-K partials and other
intermediates are not counted), its share of the GPU's peak HBM bandwidth, the speedup over the
torch reference and the largest difference from it. Shapes are those of a Qwen2.5-1.5B-shaped
LenVM (hidden 1536, 28 layers, 12 q / 2 kv heads, head dim 128, vocabulary 151936) with random
weights: batch 1/8/32/64, prefix 512/4k/16k, K = 5/15 candidates (tree = root + K).

`step` compares one whole guided scoring step (candidate selection, the 28-layer star-tree
forward of B * (1 + K) tokens, value head and decision, logits for the sampler) with the Triton
kernels and with the torch path, against one plain decode step of the same LenVM (B tokens,
decode attention, value head). The model is a plain-torch Qwen2-shaped decoder (RMSNorm, QKV
with bias, RoPE, SwiGLU; cuBLAS GEMMs), not SGLang's runtime, so both steps use the same
non-attention code; decode attention is SGLang's Triton decode kernel when importable (else the
star kernel with a tree of 1, which reads the KV exactly like a decode kernel). Steps are timed
eagerly and as CUDA graphs (SGLang replays decode steps as graphs; the scorer runs eagerly).

--smoke runs everything on tiny shapes on the CPU under TRITON_INTERPRET=1 (timings there are
meaningless) and fails if any kernel disagrees with its reference: an end-to-end check for CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Shape:
    hidden: int = 1536
    layers: int = 28
    heads: int = 12
    kv_heads: int = 2
    head_dim: int = 128
    intermediate: int = 8960
    vocab: int = 151936
    rope_theta: float = 1e6


SMOKE_SHAPE = Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                    vocab=512)


def parse_args(argv):
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU under TRITON_INTERPRET=1 (CI check, no GPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results/bench_kernels_<gpu>.json)")
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 64])
    p.add_argument("--prefixes", type=ints, default=[512, 4096, 16384])
    p.add_argument("--ks", type=ints, default=[5, 15], help="candidates per request")
    p.add_argument("--kernels", default="star,head,candidates,step",
                   help="comma list of star, head, candidates, step, tune")
    p.add_argument("--step-batch", type=int, default=32)
    p.add_argument("--step-k", type=int, default=15)
    p.add_argument("--step-prefixes", type=ints, default=[512, 4096])
    p.add_argument("--decode-attn", choices=["auto", "sglang", "star"], default="auto",
                   help="decode attention of the plain decode step")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="peak HBM bandwidth (default: from the device's memory clock and bus)")
    p.add_argument("--no-reference", action="store_true", help="skip timing the torch paths")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.prefixes, args.ks = [2], [40], [3]
        args.step_batch, args.step_k, args.step_prefixes = 2, 3, [24]
    return args


# ---------------------------------------------------------------- timing and bandwidth


class Bench:
    def __init__(self, smoke: bool):
        import torch

        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")

    def time_ms(self, fn):
        if self.smoke:  # the interpreter: one run, for completeness only
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=60, return_mode="median")

    def graph_ms(self, fn):
        """Time of a CUDA-graph replay of fn (None where capture is impossible)."""
        if self.smoke:
            return None
        from triton.testing import do_bench_cudagraph

        try:
            return do_bench_cudagraph(fn, rep=60, return_mode="median")
        except Exception as e:  # a host sync inside fn: report eager times only
            print(f"  (CUDA graph capture failed: {type(e).__name__}: {e})")
            return None


def peak_gbps(args):
    import torch

    if args.peak_gbps:
        return args.peak_gbps, "--peak-gbps"
    if args.smoke:
        return None, None
    prop = torch.cuda.get_device_properties(0)
    clock_khz = getattr(prop, "memory_clock_rate", 0)
    bus_bits = getattr(prop, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None, None
    # double data rate: 2 transfers per memory clock
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device memory clock x bus width"


def _row(bytes_moved, t_ms, ref_ms, peak, **fields):
    gbps = bytes_moved / (t_ms * 1e-3) / 1e9
    return dict(fields, bytes=int(bytes_moved), triton_ms=round(t_ms, 4),
                gbps=round(gbps, 1), pct_peak=round(100 * gbps / peak, 1) if peak else None,
                torch_ms=round(ref_ms, 4) if ref_ms else None,
                speedup=round(ref_ms / t_ms, 2) if ref_ms else None)


# ---------------------------------------------------------------- star attention


def bench_star(args, bench, shape, peak, overrides_list=None):
    import torch

    from sglang_lenvm.kernels import star_attention as sa
    from sglang_lenvm.runtime.star_attention import StarMeta, star_attention_torch

    dev, dtype = bench.device, torch.bfloat16
    hq, hkv, d = shape.heads, shape.kv_heads, shape.head_dim
    max_b, max_p = max(args.batches), max(args.prefixes)
    slots = max_b * max_p
    g = torch.Generator(device=dev).manual_seed(0)
    kc = torch.randn(slots, hkv, d, generator=g, device=dev, dtype=dtype)
    vc = torch.randn(slots, hkv, d, generator=g, device=dev, dtype=dtype)
    # Scattered slots (a long-running radix cache), each request's prefix in its own table row.
    req_to_token = torch.randperm(slots, generator=g, device=dev).int().view(max_b, max_p)
    configs = overrides_list or [{}]
    rows = []
    for B in args.batches:
        for P in args.prefixes:
            for K in args.ks:
                T = K + 1
                meta = StarMeta(req_pool_indices=torch.arange(B, device=dev),
                                prefix_lens=torch.full((B,), P, device=dev), max_prefix_len=P,
                                tree_size=T, has_root=True, root_slots=None)
                q = torch.randn(B * T, hq, d, generator=g, device=dev, dtype=dtype)
                k = torch.randn(B * T, hkv, d, generator=g, device=dev, dtype=dtype)
                v = torch.randn(B * T, hkv, d, generator=g, device=dev, dtype=dtype)
                scale = d ** -0.5
                want = star_attention_torch(q, k, v, kc, vc, req_to_token, meta, scale)
                ref_ms = None if args.no_reference else bench.time_ms(
                    lambda: star_attention_torch(q, k, v, kc, vc, req_to_token, meta, scale))
                elem = dtype.itemsize
                bytes_moved = (B * P * hkv * 2 * d * kc.element_size()  # prefix K and V, once
                               + B * P * 4  # their slot indices
                               + B * T * (hq + 2 * hkv) * d * elem  # q, tree k, v
                               + B * T * hq * d * elem)  # output
                for ov in configs:
                    got = sa.star_attention_triton(q, k, v, kc, vc, req_to_token, meta, scale,
                                                   **ov)
                    err = (got.float() - want.float()).abs().max().item()
                    t_ms = bench.time_ms(lambda: sa.star_attention_triton(
                        q, k, v, kc, vc, req_to_token, meta, scale, **ov))
                    plan = sa.launch_plan(B, T, hq, hkv, d, d, P, dtype, dev, **ov)
                    rows.append(_row(bytes_moved, t_ms, ref_ms, peak, batch=B, prefix=P, k=K,
                                     splits=plan["splits"], block_n=plan["block_n"],
                                     num_stages=plan["num_stages"], max_err=err))
                    print(f"  star B={B} P={P} K={K} {ov or ''}: {rows[-1]['triton_ms']} ms, "
                          f"{rows[-1]['gbps']} GB/s, x{rows[-1]['speedup']}, err {err:.2e}")
                    if bench.smoke:
                        assert err < 3e-2, f"star attention differs from the reference: {err}"
    return rows


# ---------------------------------------------------------------- value head + decision


def _decision_inputs(B, K, vocab, dev, g):
    import torch

    base = torch.softmax(torch.randn(B, K, generator=g, device=dev), -1)
    return dict(
        ids=torch.randint(0, vocab, (B, K), generator=g, device=dev),
        base_prob=base.sort(-1, descending=True).values,
        valid=torch.ones(B, K, dtype=torch.bool, device=dev),
        stop_ids=torch.tensor([[vocab - 1, -1]], device=dev).expand(B, 2).contiguous(),
        mode=torch.arange(B, device=dev) % 4,
        target=torch.randint(5, 400, (B,), generator=g, device=dev),
        generated=torch.randint(0, 200, (B,), generator=g, device=dev),
        beta=torch.randn(B, generator=g, device=dev),
        greedy=torch.arange(B, device=dev) % 3 == 0)


def _kernel_codes() -> dict:
    """What the fused decision kernel is told of the runtime: its mode codes and the default
    equal distance (the kernel module imports nothing from the runtime)."""
    from sglang_lenvm.config import DEFAULT_EQUAL_DISTANCE
    from sglang_lenvm.runtime.decision import equal_uses_ratio
    from sglang_lenvm.schema import MODE_AT_LEAST, MODE_AT_MOST, MODE_EQUAL

    return dict(mode_codes=(MODE_EQUAL, MODE_AT_MOST, MODE_AT_LEAST),
                equal_ratio=equal_uses_ratio(DEFAULT_EQUAL_DISTANCE))


def torch_head_decision(head, hidden, *, ids, base_prob, valid, stop_ids, mode, target,
                        generated, beta, greedy, gamma, has_root=True):
    """The torch path: ValueHead, sigmoid, force_stop_value, the scorer's NaN handling, decide."""
    import torch

    from sglang_lenvm.runtime.decision import Candidates, decide, force_stop_value

    B, K = ids.shape
    p = torch.sigmoid(head(hidden)).view(B, K + int(has_root))
    p_cand = force_stop_value(p[:, int(has_root):], ids, stop_ids)
    p_cand = torch.nan_to_num(p_cand, nan=0.0)
    return p_cand, decide(Candidates(ids=ids, base_prob=base_prob, valid=valid), p_cand,
                          mode=mode, target=target, generated=generated, beta=beta,
                          greedy=greedy, gamma=gamma)


def _make_head(H, dev):
    import torch

    from sglang_lenvm.value_head import ValueHead

    torch.manual_seed(0)
    return ValueHead(H).to(dev)


def bench_head(args, bench, shape, peak, gamma):
    import torch

    from sglang_lenvm.kernels.value_head_decision import value_head_decision_triton

    dev, H = bench.device, shape.hidden
    head = _make_head(H, dev)
    g = torch.Generator(device=dev).manual_seed(1)
    rows = []
    for B in args.batches:
        for K in args.ks:
            N = B * (K + 1)
            hidden = torch.randn(N, H, generator=g, device=dev, dtype=torch.bfloat16)
            kw = _decision_inputs(B, K, shape.vocab, dev, g)
            weights = (head.fc.weight, head.fc.bias, head.summary.weight, head.summary.bias)

            def run():
                return value_head_decision_triton(hidden, *weights, has_root=True, gamma=gamma,
                                                  **kw, **_kernel_codes())

            def ref():
                return torch_head_decision(head, hidden, gamma=gamma, **kw)

            got, (p_want, q_want) = run(), ref()
            p_err = (got.p_cand - p_want).abs().max().item()
            q_err = (got.q - q_want).abs().nan_to_num(0.0).max().item()
            ref_ms = None if args.no_reference else bench.time_ms(ref)
            t_ms = bench.time_ms(run)
            bytes_moved = (H * H * 4 + 3 * H * 4 + N * H * 2  # fc + biases + summary, hidden
                           + B * K * (8 + 4 + 1 + 4 + 4) + N * 4 + B * 40)  # candidates, outputs
            rows.append(_row(bytes_moved, t_ms, ref_ms, peak, batch=B, k=K, rows=N,
                             max_err_p=p_err, max_err_q=q_err))
            print(f"  head B={B} K={K}: {rows[-1]['triton_ms']} ms, x{rows[-1]['speedup']}, "
                  f"err p {p_err:.1e} q {q_err:.1e}")
            if bench.smoke:
                assert p_err < 1e-5 and q_err < 1e-4, (p_err, q_err)
    return rows


# ---------------------------------------------------------------- candidate selection


def bench_candidates(args, bench, shape, peak):
    import torch

    from sglang_lenvm.kernels.candidates import select_candidates_triton
    from sglang_lenvm.runtime.decision import select_candidates

    dev, V = bench.device, shape.vocab
    g = torch.Generator(device=dev).manual_seed(2)
    rows = []
    for B in args.batches:
        for K in args.ks:
            logits = torch.randn(B, V, generator=g, device=dev) * 4  # the scorer's float32 rows
            temp = torch.full((B,), 0.8, device=dev)
            top_k = torch.full((B,), K, device=dev)
            top_p = torch.full((B,), 0.95, device=dev)
            min_p = torch.full((B,), 0.01, device=dev)
            sel = (logits, temp, top_k, top_p, min_p, K)
            got, want = select_candidates_triton(*sel), select_candidates(*sel)
            err = (got.base_prob - want.base_prob).abs().max().item()
            same = bool((got.valid == want.valid).all() and
                        ((got.ids == want.ids) | ~want.valid).all())
            ref_ms = None if args.no_reference else bench.time_ms(lambda: select_candidates(*sel))
            t_ms = bench.time_ms(lambda: select_candidates_triton(*sel))
            bytes_moved = B * V * 4 + B * K * (8 + 4 + 1) + B * 20
            rows.append(_row(bytes_moved, t_ms, ref_ms, peak, batch=B, k=K, max_err=err,
                             same_selection=same))
            print(f"  candidates B={B} K={K}: {rows[-1]['triton_ms']} ms, "
                  f"{rows[-1]['gbps']} GB/s, x{rows[-1]['speedup']}, same={same}")
            if bench.smoke:
                assert same and err < 1e-6, (same, err)
    return rows


# ---------------------------------------------------------------- whole scoring step


class Backbone:
    """Random Qwen2-shaped decoder; `forward` runs flat tokens through all layers with a given
    attention callback (the only part that differs between the steps compared)."""

    def __init__(self, shape, dev, dtype):
        import torch

        self.s, self.dev = shape, dev
        g = torch.Generator(device=dev).manual_seed(3)
        H, hd = shape.hidden, shape.head_dim
        qkv = (shape.heads + 2 * shape.kv_heads) * hd

        def w(*size):
            return (torch.randn(*size, generator=g, device=dev) / math.sqrt(size[-1])).to(dtype)

        self.embed = w(shape.vocab, H)
        self.layers = [dict(ln1=torch.ones(H, device=dev, dtype=dtype), qkv=w(qkv, H),
                            qkv_b=w(qkv) * 0.1, o=w(H, shape.heads * hd),
                            ln2=torch.ones(H, device=dev, dtype=dtype),
                            gate_up=w(2 * shape.intermediate, H), down=w(H, shape.intermediate))
                       for _ in range(shape.layers)]
        self.norm = torch.ones(H, device=dev, dtype=dtype)
        self.inv_freq = 1.0 / shape.rope_theta ** (
            torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd)

    @staticmethod
    def rms(x, w, eps=1e-6):
        import torch

        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

    @staticmethod
    def rope(x, cos, sin):  # neox style, x [N, heads, D]
        import torch

        x1, x2 = x.float().chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

    def forward(self, tokens, positions, attn):
        import torch.nn.functional as F

        s = self.s
        N, hd = tokens.shape[0], s.head_dim
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
        x = self.embed[tokens]
        for i, lw in enumerate(self.layers):
            qkv = F.linear(self.rms(x, lw["ln1"]), lw["qkv"], lw["qkv_b"])
            q, k, v = qkv.split([s.heads * hd, s.kv_heads * hd, s.kv_heads * hd], -1)
            q = self.rope(q.view(N, s.heads, hd), cos, sin)
            k = self.rope(k.view(N, s.kv_heads, hd), cos, sin)
            o = attn(i, q, k, v.view(N, s.kv_heads, hd))
            x = x + F.linear(o.reshape(N, -1), lw["o"])
            gate, up = F.linear(self.rms(x, lw["ln2"]), lw["gate_up"]).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, lw["down"])
        return self.rms(x, self.norm)


def _sglang_decode(B, hq, dv, req_to_token, seq_len, dev):
    """SGLang's Triton decode attention over req_to_token[:, :seq_len] (None if unavailable)."""
    import torch

    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    except Exception as e:  # noqa: BLE001 - any import problem: fall back to the star kernel
        print(f"  (SGLang decode kernel unavailable: {e}; using the star kernel with T = 1)")
        return None
    max_splits = 8  # SGLang's default --triton-attention-num-kv-splits
    kv_indptr = torch.arange(B + 1, device=dev, dtype=torch.int32) * seq_len
    kv_indices = req_to_token[:B, :seq_len].reshape(-1).contiguous()
    logits_buf = torch.empty(B, hq, max_splits, dv, device=dev, dtype=torch.float32)
    lse_buf = torch.empty(B, hq, max_splits, device=dev, dtype=torch.float32)
    num_splits = torch.full((B,), max_splits, device=dev, dtype=torch.int32)

    def run(q, kc, vc, scale):
        o = torch.empty(q.shape[0], hq, dv, device=dev, dtype=q.dtype)
        decode_attention_fwd(q, kc, vc, o, kv_indptr, kv_indices, logits_buf, lse_buf,
                             num_splits, max_splits, scale, 1.0, 1.0)
        return o

    return run


def bench_step(args, bench, shape, gamma):
    import torch

    from sglang_lenvm.kernels.candidates import select_candidates_triton
    from sglang_lenvm.kernels.star_attention import star_attention_triton
    from sglang_lenvm.kernels.value_head_decision import value_head_decision_triton
    from sglang_lenvm.runtime.decision import distribution_to_logits, select_candidates
    from sglang_lenvm.runtime.star_attention import StarMeta, star_attention_torch

    dev = bench.device
    dtype = torch.float32 if bench.smoke else torch.bfloat16  # smoke: exact comparison
    B, K, T, V = args.step_batch, args.step_k, args.step_k + 1, shape.vocab
    hq, hkv, hd = shape.heads, shape.kv_heads, shape.head_dim
    model = Backbone(shape, dev, dtype)
    head = _make_head(shape.hidden, dev)
    weights = (head.fc.weight, head.fc.bias, head.summary.weight, head.summary.bias)
    g = torch.Generator(device=dev).manual_seed(4)
    results = []
    for P in args.step_prefixes:
        slots = B * (P + 1)
        caches = [(torch.randn(slots, hkv, hd, generator=g, device=dev, dtype=dtype),
                   torch.randn(slots, hkv, hd, generator=g, device=dev, dtype=dtype))
                  for _ in range(shape.layers)]
        req_to_token = torch.randperm(slots, generator=g, device=dev).int().view(B, P + 1)
        root_slots = req_to_token[:, P].long()  # this step's token: position P
        prefix = torch.full((B,), P, device=dev)
        input_ids = torch.randint(0, V, (B,), generator=g, device=dev)
        logits = torch.randn(B, V, generator=g, device=dev) * 4
        temps = torch.full((B,), 0.8, device=dev)
        trunc = (torch.full((B,), K, device=dev), torch.full((B,), 0.95, device=dev),
                 torch.full((B,), 0.0, device=dev))
        dec_kw = _decision_inputs(B, K, V, dev, g)
        for key in ("ids", "base_prob", "valid"):
            dec_kw.pop(key)
        scale = hd ** -0.5

        def star_attention(kernel, tree):
            meta = StarMeta(req_pool_indices=torch.arange(B, device=dev), prefix_lens=prefix,
                            max_prefix_len=P, tree_size=tree, has_root=True,
                            root_slots=root_slots)

            def attn(i, q, k, v):
                kc, vc = caches[i]
                roots = torch.arange(B, device=dev) * tree
                kc[root_slots], vc[root_slots] = k[roots], v[roots]  # the KV mirror write
                return kernel(q, k, v, kc, vc, req_to_token, meta, scale)
            return attn

        def scoring_step(use_triton):
            select = select_candidates_triton if use_triton else select_candidates
            cand = select(logits, temps, *trunc, K)
            tokens = torch.cat([input_ids.view(-1, 1), cand.ids], 1).view(-1)
            pos = torch.cat([prefix.view(-1, 1), (prefix + 1).view(-1, 1).expand(B, K)], 1)
            kernel = star_attention_triton if use_triton else star_attention_torch
            hidden = model.forward(tokens, pos.reshape(-1), star_attention(kernel, T))
            if use_triton:
                out = value_head_decision_triton(
                    hidden, *weights, ids=cand.ids, base_prob=cand.base_prob, valid=cand.valid,
                    has_root=True, gamma=gamma, **dec_kw, **_kernel_codes())
                p_cand, q = out.p_cand, out.q
            else:
                p_cand, q = torch_head_decision(head, hidden, ids=cand.ids,
                                                base_prob=cand.base_prob, valid=cand.valid,
                                                gamma=gamma, **dec_kw)
            return p_cand, distribution_to_logits(q, cand.ids, V, temps)

        decode_kernel = None
        if args.decode_attn in ("auto", "sglang"):
            decode_kernel = _sglang_decode(B, hq, hd, req_to_token, P + 1, dev)
            if decode_kernel is None and args.decode_attn == "sglang":
                sys.exit("bench_kernels: --decode-attn sglang requested but unavailable")

        def decode_attention(i, q, k, v):
            kc, vc = caches[i]
            kc[root_slots], vc[root_slots] = k, v
            return decode_kernel(q, kc, vc, scale)

        def decode_step(use_sglang=decode_kernel is not None):
            attn = decode_attention if use_sglang else star_attention(star_attention_triton, 1)
            hidden = model.forward(input_ids, prefix, attn)
            return torch.sigmoid(head(hidden))

        with torch.no_grad():
            p_tri, _ = scoring_step(True)
            p_ref, _ = scoring_step(False)
            err = (p_tri - p_ref).abs().max().item()
            # the two decode attentions agree (a check of how the baseline is called)
            decode_err = ((decode_step(True) - decode_step(False)).abs().max().item()
                          if decode_kernel else None)
            if bench.smoke:
                assert err < 1e-4, f"scoring step: triton and torch values differ by {err}"
                assert decode_err is None or decode_err < 1e-4, decode_err
            row = dict(batch=B, k=K, prefix=P, layers=shape.layers, max_err_p=err,
                       decode_attention="sglang triton decode" if decode_kernel
                       else "star kernel, tree of 1", decode_max_err_p=decode_err)
            for name, fn in [("scoring_triton", lambda: scoring_step(True)),
                             ("scoring_torch", None if args.no_reference
                              else lambda: scoring_step(False)),
                             ("decode", decode_step)]:
                if fn is None:
                    continue
                row[f"{name}_ms"] = round(bench.time_ms(fn), 4)
                graph = bench.graph_ms(fn)
                row[f"{name}_graph_ms"] = round(graph, 4) if graph else None
        for a, b in [("scoring_triton_ms", "decode_ms"),
                     ("scoring_triton_graph_ms", "decode_graph_ms"),
                     ("scoring_triton_ms", "decode_graph_ms")]:
            if row.get(a) and row.get(b):
                row[f"ratio_{a[:-3]}_over_{b[:-3]}"] = round(row[a] / row[b], 2)
        if row.get("scoring_torch_ms"):
            row["speedup_over_torch"] = round(row["scoring_torch_ms"] / row["scoring_triton_ms"], 2)
        print(f"  step P={P}: {row}")
        results.append(row)
    return results


# ---------------------------------------------------------------- tuning sweep


def bench_tune(args, bench, shape, peak):
    """Launch alternatives of the star kernel at the headline shape (B 32, P 4k, K 15)."""
    sub = argparse.Namespace(**vars(args))
    sub.batches, sub.prefixes, sub.ks = [32], [4096], [15]
    sub.no_reference = True
    overrides = ([{}] + [{"num_splits": s} for s in (1, 2, 3, 4, 6, 8, 12)]
                 + [{"block_n": n, "num_stages": st} for n in (32, 64) for st in (2, 3, 4)])
    return bench_star(sub, bench, shape, peak, overrides)


# ---------------------------------------------------------------- report


def markdown(report):
    lines = [f"# Kernel benchmark on {report['device']}",
             f"peak HBM bandwidth: {report['peak_gbps'] or 'unknown'} GB/s "
             f"({report['peak_source']}); torch {report['torch']}, triton {report['triton']}"]
    cols = {
        "star_attention": ["batch", "prefix", "k", "splits", "triton_ms", "gbps", "pct_peak",
                           "torch_ms", "speedup", "max_err"],
        "tune": ["batch", "prefix", "k", "splits", "block_n", "num_stages", "triton_ms", "gbps",
                 "pct_peak"],
        "value_head_decision": ["batch", "k", "rows", "triton_ms", "gbps", "pct_peak",
                                "torch_ms", "speedup", "max_err_p", "max_err_q"],
        "candidates": ["batch", "k", "triton_ms", "gbps", "pct_peak", "torch_ms", "speedup",
                       "same_selection"],
        "step": ["batch", "k", "prefix", "scoring_triton_ms", "scoring_triton_graph_ms",
                 "scoring_torch_ms", "decode_ms", "decode_graph_ms",
                 "ratio_scoring_triton_over_decode",
                 "ratio_scoring_triton_graph_over_decode_graph",
                 "ratio_scoring_triton_over_decode_graph", "speedup_over_torch",
                 "decode_attention"],
    }
    for section, names in cols.items():
        rows = report.get(section)
        if not rows:
            continue
        lines += ["", f"## {section}", "", "| " + " | ".join(names) + " |",
                  "|" + "---|" * len(names)]
        for r in rows:
            vals = [r.get(n) for n in names]
            lines.append("| " + " | ".join(
                f"{v:.2e}" if isinstance(v, float) and n.startswith("max_err") else str(v)
                for n, v in zip(names, vals)) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when kernels are defined: restart with it set.
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_kernels", *argv], env)
    if not args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench_kernels: TRITON_INTERPRET=1 is set; unset it to benchmark on the GPU "
                 "(or pass --smoke)")

    import torch
    import triton

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_kernels: no CUDA device found. This benchmark times GPU kernels and "
                 "needs an NVIDIA GPU (H100/H200); use --smoke for the CPU interpreter check.")
    from sglang_lenvm.config import DEFAULT_GAMMA

    shape = SMOKE_SHAPE if args.smoke else Shape()
    bench = Bench(args.smoke)
    peak, source = peak_gbps(args)
    name = "CPU (Triton interpreter, smoke)" if args.smoke else torch.cuda.get_device_name(0)
    report = dict(device=name, peak_gbps=round(peak, 1) if peak else None, peak_source=source,
                  torch=torch.__version__, triton=triton.__version__, smoke=args.smoke,
                  shape=dataclasses.asdict(shape), kv_dtype="bfloat16", gamma=DEFAULT_GAMMA,
                  args={k: str(v) for k, v in vars(args).items()})
    wanted = set(args.kernels.split(","))
    with torch.no_grad():
        if "star" in wanted:
            print("star-tree attention")
            report["star_attention"] = bench_star(args, bench, shape, peak)
        if "tune" in wanted and not args.smoke:
            print("star-tree attention launch sweep")
            report["tune"] = bench_tune(args, bench, shape, peak)
        if "head" in wanted:
            print("value head + decision")
            report["value_head_decision"] = bench_head(args, bench, shape, peak, DEFAULT_GAMMA)
        if "candidates" in wanted:
            print("candidate selection")
            report["candidates"] = bench_candidates(args, bench, shape, peak)
        if "step" in wanted:
            print("whole scoring step vs plain decode step")
            report["step"] = bench_step(args, bench, shape, DEFAULT_GAMMA)

    out = args.out
    if out is None:
        tag = "smoke" if args.smoke else name.replace(" ", "_").replace("/", "_")
        out = ROOT / "benchmarks" / "results" / f"bench_kernels_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print()
    print(markdown(report))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
