"""Every kernel launch compiles for an H100 (sm_90a), without a GPU.

The interpreter checks semantics but not the compiler: it accepts programs the GPU compiler
rejects (and vice versa it has quirks of its own). Here each wrapper is called with CPU tensors
while its kernels are swapped for recorders, and every recorded launch is compiled ahead of time
for sm_90 with the argument specialisation the JIT would use (16-byte aligned pointers,
divisibility-by-16 and ==1 integer hints), then run through ptxas to check for register spills.
"""

import os
import subprocess

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="the interpreter replaces triton.jit; compile needs it")

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


class _Recorder:
    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.fn, grid, args, dict(kw)))


def _record(monkeypatch, module, names):
    calls = []
    for name in names:
        monkeypatch.setattr(module, name, _Recorder(getattr(module, name), calls))
    return calls


def _compile_sm90(fn, args, kw):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    signature, constants, attrs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(fn.arg_names, args)):
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + _TYPES[arg.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(arg, bool):
            signature[name] = "i1"
        elif isinstance(arg, int):
            if arg == 1:  # the JIT turns integer 1 into a constant
                signature[name], constants[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= arg < 2**31 else "i64"
            if arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(arg, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(arg)}")
    for name, value in kw.items():
        signature[name], constants[name] = "constexpr", value
    src = ASTSource(fn, signature, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _spills(compiled, tmp_path):
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = tmp_path / "k.ptx"
    ptx.write_text(compiled.asm["ptx"])
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(ptx), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True)
    line = next(x for x in log.stderr.splitlines() if "spill stores" in x)
    return int(line.split("bytes spill stores")[0].split(",")[-1])


def _compile_all(calls, tmp_path):
    assert calls
    for fn, _grid, args, kw in calls:
        compiled = _compile_sm90(fn, args, kw)
        if fn.fn.__name__ == "_star_fwd" and args[0].dtype != torch.float32:
            # 16-bit inputs must reach the tensor cores: wgmma, or mma.sync for < 64 rows
            # (float32 uses IEEE FMA dots)
            ptx = compiled.asm["ptx"]
            assert "wgmma" in ptx or "mma.sync" in ptx, (args[0].dtype, kw)
        assert _spills(compiled, tmp_path) == 0, fn.fn.__name__


def test_star_attention_compiles(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from sglang_lenvm.kernels import star_attention as sa

    calls = _record(monkeypatch, sa, ["_star_fwd", "_star_merge"])
    for dtype, d, hq, hkv, K, root, prefix in [
        (torch.bfloat16, 128, 12, 2, 15, True, 4096),  # Qwen2.5-1.5B, split-K + merge
        (torch.float16, 64, 14, 2, 5, True, 300),  # Qwen2.5-0.5B, one split
        (torch.float32, 128, 12, 2, 15, True, 4096),  # float32: IEEE dots, 64-row blocks
        (torch.bfloat16, 128, 8, 1, 1, False, 4096),  # GQA 8, K = 1, prefill tree: 16 rows
    ]:
        B, T = 4, K + int(root)
        meta = SimpleNamespace(prefix_lens=torch.full((B,), prefix), max_prefix_len=prefix,
                               req_pool_indices=torch.arange(B), tree_size=T, has_root=root)
        q = torch.empty(B * T, hq, d, dtype=dtype)
        kv = torch.empty(B * T, hkv, d, dtype=dtype)
        cache = torch.empty(64, hkv, d, dtype=dtype)
        sa.star_attention_triton(q, kv, kv, cache, cache, torch.zeros(8, 64, dtype=torch.int32),
                                 meta, 0.1)
    assert {c[0].fn.__name__ for c in calls} == {"_star_fwd", "_star_merge"}
    _compile_all(calls, tmp_path)


def test_value_head_decision_compiles(monkeypatch, tmp_path):
    from sglang_lenvm.kernels import value_head_decision as vhd

    calls = _record(monkeypatch, vhd, ["_value_head_kernel", "_decision_kernel"])
    monkeypatch.setattr(vhd, "_precision", lambda device: "tf32x3")  # what a CUDA device gets
    B, K, H = 32, 15, 1536
    i64 = lambda *s: torch.zeros(*s, dtype=torch.int64)  # noqa: E731
    vhd.value_head_decision_triton(
        torch.empty(B * (K + 1), H, dtype=torch.bfloat16), torch.empty(H, H), torch.empty(H),
        torch.empty(1, H), torch.empty(1), ids=i64(B, K), base_prob=torch.empty(B, K),
        valid=torch.ones(B, K, dtype=torch.bool), stop_ids=i64(B, 2), has_root=True,
        mode=i64(B), target=i64(B), generated=i64(B), beta=torch.zeros(B),
        greedy=torch.zeros(B, dtype=torch.bool), gamma=0.99, mode_codes=(1, 2, 3),
        equal_ratio=True)
    _compile_all(calls, tmp_path)


def test_candidates_compile(monkeypatch, tmp_path):
    from sglang_lenvm.kernels import candidates

    calls = _record(monkeypatch, candidates, ["_topk_partial_kernel", "_topk_merge_kernel"])
    B = 32
    candidates.select_candidates_triton(torch.empty(B, 151936), torch.ones(B, 1),
                                        torch.full((B,), 16), torch.ones(B), torch.zeros(B), 16)
    _compile_all(calls, tmp_path)
