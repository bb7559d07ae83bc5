"""Start-up fails fast with a clear message on checkpoints and settings we cannot serve.

Each case runs the launcher's `main` in this process: every refusal happens before it starts
any SGLang process (the launcher exits with the message).
"""

import os
import types

import pytest

from sglang_lenvm.testing import tiny_models as tm
from sglang_lenvm.runtime.repeat_guard import WINDOW


def launch(*args, capsys=None):
    """launch_server.main(args) -> its exit code and message (stderr), without serving."""
    import sglang_lenvm.launch_server as ls

    env = dict(os.environ)
    code, message = 0, ""
    try:
        ls.main(list(args))
    except SystemExit as e:
        code, message = (1, e.code) if isinstance(e.code, str) else (e.code, "")
    else:
        raise AssertionError("the launcher did not refuse")
    finally:
        os.environ.clear()
        os.environ.update(env)
    if capsys is not None:
        message += capsys.readouterr().err
    return types.SimpleNamespace(returncode=code, stderr=message)


def test_lenvm_without_head_is_refused(models, tmp_path):
    tm.build_lenvm(tmp_path / "plain", models / "tok", head_placement="none")
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(tmp_path / "plain"))
    assert r.returncode != 0
    assert "no value head found" in r.stderr


def test_mismatched_tokenizer_is_refused(models):
    r = launch("--model-path", str(models / "cbase"), "--lenvm-path", str(models / "lenvm"))
    assert r.returncode != 0
    assert "does not share the base model's tokenizer" in r.stderr


def test_bad_flags_are_refused(models, capsys):
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--lenvm-gamma", "1.5")
    assert r.returncode != 0 and "--lenvm-gamma must be in (0, 1)" in r.stderr
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--lenvm-top-k", "0")
    assert r.returncode != 0 and "--lenvm-top-k" in r.stderr
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--lenvm-equal-distance", "log", capsys=capsys)
    assert r.returncode != 0 and "--lenvm-equal-distance: invalid choice: 'log'" in r.stderr
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--lenvm-sentence-end", "yes", capsys=capsys)
    assert r.returncode != 0 and "--lenvm-sentence-end: invalid choice: 'yes'" in r.stderr
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--lenvm-equal-max-overshoot", "nan")
    assert r.returncode != 0 and "--lenvm-equal-max-overshoot must be >= 0" in r.stderr


@pytest.mark.parametrize("flag,value,message", [
    ("--lenvm-plausibility", "1.5", "--lenvm-plausibility must be in [0, 1]"),
    ("--lenvm-plausibility", "nan", "--lenvm-plausibility must be in [0, 1]"),
    ("--lenvm-equal-softness", "-1", "--lenvm-equal-softness must be >= 0"),
    ("--lenvm-at-most-softness", "nan", "--lenvm-at-most-softness must be >= 0"),
    ("--lenvm-at-most-softness", "-0.5", "--lenvm-at-most-softness must be >= 0"),
    ("--lenvm-max-star-tokens", "10", "--lenvm-max-star-tokens must hold one request's largest tree"),
    ("--lenvm-at-least-end-pull", "inf", "--lenvm-at-least-end-pull must be a finite"),
    ("--lenvm-repeat-ngram", "-1", f"--lenvm-repeat-ngram must be in [0, {WINDOW}]"),
    ("--lenvm-repeat-limit", "0", "--lenvm-repeat-limit must be >= 1"),
    ("--lenvm-max-n", "0", "--lenvm-max-n must be >= 1"),
    ("--lenvm-at-most-end-boost", "0.5", "--lenvm-at-most-end-boost must be in [1, 1e6]"),
    ("--lenvm-at-most-end-boost", "nan", "--lenvm-at-most-end-boost must be in [1, 1e6]"),
    ("--lenvm-equal-undershoot", "0", "--lenvm-equal-undershoot must be in [0.1, 10]"),
    ("--lenvm-equal-undershoot", "inf", "--lenvm-equal-undershoot must be in [0.1, 10]")])
def test_bad_rule_flags_are_refused(models, flag, value, message):
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               flag, value)
    assert r.returncode != 0 and message in r.stderr, (flag, value, r.stderr)


def test_unsupported_server_option_is_refused(models):
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--enable-mixed-chunk", "--port", "31999")
    assert r.returncode != 0
    assert "sglang-lenvm does not support: --enable-mixed-chunk" in r.stderr


def copy_with_config(src, dst, **changes):
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_quantized_kv_cache_is_refused(models):
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--kv-cache-dtype", "fp8_e4m3", "--port", "31999")
    assert r.returncode != 0
    assert "does not support: --kv-cache-dtype fp8_e4m3" in r.stderr


def test_hybrid_sliding_window_base_is_refused(models, tmp_path):
    base = copy_with_config(models / "base", tmp_path / "swa", is_hybrid_swa=True,
                            sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    r = launch("--model-path", str(base), "--lenvm-path", str(models / "lenvm"), "--port", "31999")
    assert r.returncode != 0 and "a hybrid sliding-window base model" in r.stderr, r.stderr[-2000:]


def test_hybrid_linear_attention_base_is_refused(models, tmp_path):
    from transformers import Qwen3NextConfig

    cfg = Qwen3NextConfig(
        vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_value_heads=2,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=2,
        num_experts_per_tok=1, layer_types=["linear_attention", "full_attention"]).to_dict()
    cfg["architectures"] = ["Qwen3NextForCausalLM"]
    base = copy_with_config(models / "base", tmp_path / "next")
    import json
    (base / "config.json").write_text(json.dumps(cfg))
    r = launch("--model-path", str(base), "--lenvm-path", str(models / "lenvm"), "--port", "31999")
    assert r.returncode != 0 and "linear-attention / Mamba base model" in r.stderr, r.stderr[-2000:]


def test_lenvm_smaller_than_the_tokenizer_is_refused(models, tmp_path):
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(str(models / "tok")))
    lenvm = copy_with_config(models / "lenvm", tmp_path / "small", vocab_size=n - 10)
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(lenvm), "--port", "31999")
    assert r.returncode != 0
    assert f"a LenVM whose embedding has {n - 10} rows, fewer than the {n} tokens" in r.stderr


def test_parallelism_flags():
    """--dp-size and --tp-size are served (a LenVM per scheduler, sharded over its TP
    group); pipeline parallelism is refused with the reason."""
    from sglang_lenvm.runtime.compat import check_server_args

    check_server_args(types.SimpleNamespace(dp_size=2, tp_size=2, pp_size=1))
    with pytest.raises(ValueError, match="--pp-size > 1 .*use --tp-size or --dp-size"):
        check_server_args(types.SimpleNamespace(dp_size=1, tp_size=1, pp_size=2))
    with pytest.raises(ValueError, match="--enable-dp-attention"):
        check_server_args(types.SimpleNamespace(dp_size=2, enable_dp_attention=True))


def test_cpu_cores_are_split_among_ranks():
    from sglang_lenvm.launch_server import cpu_groups

    assert cpu_groups([0, 1], 2) == "0|1"
    assert cpu_groups([0, 1, 2, 3, 4], 2) == "0,1|2,3"
    assert cpu_groups([3], 2) == "3|3"  # fewer cores than ranks: they share
