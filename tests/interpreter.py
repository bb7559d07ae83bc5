"""Triton kernel tests run in two places: compiled in-process when a CUDA device is present, and
on CPU in a child pytest process with TRITON_INTERPRET=1. The child is needed because Triton
reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any kernel module
is imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_device = pytest.mark.skipif(DEVICE is None, reason="no CUDA: runs in the interpreter child")
not_in_child = pytest.mark.skipif(INTERPRET, reason="already the interpreter child")


def run_in_interpreter(test_file: str) -> None:
    """Run `test_file`'s tests in a TRITON_INTERPRET=1 child pytest; they must all pass."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p",
                           "no:cacheprovider", "-W", "ignore::UserWarning"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, (
        proc.stdout[-6000:] + proc.stderr[-3000:])
