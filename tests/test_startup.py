"""Start-up fails fast with a clear message on checkpoints and settings we cannot serve."""

import subprocess
import sys

import pytest

from sglang_lenvm import tiny_models as tm


def launch(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sglang_lenvm.launch_server", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_lenvm_without_head_is_refused(models, tmp_path):
    tm.build_lenvm(tmp_path / "plain", models / "tok", head_placement="none")
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(tmp_path / "plain"))
    assert r.returncode != 0
    assert "no value head found" in r.stderr


def test_mismatched_tokenizer_is_refused(models):
    r = launch("--model-path", str(models / "cbase"), "--lenvm-path", str(models / "lenvm"))
    assert r.returncode != 0
    assert "does not share the base model's tokenizer" in r.stderr


def test_bad_flags_are_refused(models):
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--lenvm-gamma", "1.5")
    assert r.returncode != 0 and "--lenvm-gamma must be in (0, 1)" in r.stderr
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--lenvm-top-k", "0")
    assert r.returncode != 0 and "--lenvm-top-k" in r.stderr
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--lenvm-equal-distance", "log")
    assert r.returncode != 0 and "--lenvm-equal-distance: invalid choice: 'log'" in r.stderr
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--lenvm-equal-max-overshoot", "nan")
    assert r.returncode != 0 and "--lenvm-equal-max-overshoot must be >= 0" in r.stderr


def test_unsupported_server_option_is_refused(models):
    r = launch("--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
               "--enable-mixed-chunk", "--port", "31999")
    assert r.returncode != 0
    assert "sglang-lenvm does not support: --enable-mixed-chunk" in r.stderr
