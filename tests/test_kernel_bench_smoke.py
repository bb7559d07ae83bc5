"""`python -m benchmarks.bench_kernels --smoke` runs end to end on CPU (Triton interpreter).

The smoke run checks every kernel against its torch reference on tiny shapes (it fails if they
disagree) and writes the JSON report the GPU run writes; the GPU-only refusal is checked too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_kernels", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def test_smoke_runs_and_reports(tmp_path):
    out = tmp_path / "smoke.json"
    proc = _run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    for section in ("star_attention", "value_head_decision", "candidates", "step"):
        assert report[section], section
    assert report["candidates"][0]["same_selection"] is True
    step = report["step"][0]
    assert step["scoring_triton_ms"] > 0 and step["decode_ms"] > 0
    assert "| batch |" in proc.stdout  # the markdown table


def test_refuses_without_gpu():
    if torch.cuda.is_available():
        return  # nothing to refuse
    proc = _run("--kernels", "star", env={"TRITON_INTERPRET": "0"})
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr, proc.stderr
