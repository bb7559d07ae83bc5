"""The one-pass candidate head's training step (training/candidate_head.py): the teacher's
star values against plain forwards, and a head distilled from the oracle LenVM (whose star
values are a function of the candidate alone) that reproduces them on held-out text."""

from __future__ import annotations

import json
import random

import pytest
import torch

from reference import lenvm_p


def _records(path, n, seed, vocab=(3, 45), prompt=(3, 4, 5)):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            L = rng.randint(6, 30)
            comp = [rng.randrange(*vocab) for _ in range(L - 1)] + [2]
            f.write(json.dumps({"prompt_id": f"p{seed}-{i}", "prompt_token_ids": list(prompt),
                                "completion_token_ids": comp, "completion_tokens": L,
                                "finish_reason": "stop", "truncated": False}) + "\n")


def test_teacher_star_values_equal_plain_forwards(models):
    """Each candidate's value from the one star forward equals a plain forward of prefix + x
    (the independent reference, reference.lenvm_p)."""
    from sglang_lenvm.training.candidate_head import load_teacher, star_values

    backbone, head = load_teacher(str(models / "lenvm"))
    seq = torch.tensor([5, 17, 42, 9, 100, 3, 77, 8])
    states = torch.tensor([2, 5, 7])
    cands = torch.tensor([[1, 2, 3], [40, 50, 60], [200, 11, 5]])
    h, z, z_seq = star_values(backbone, head, seq, states, cands)
    full = lenvm_p(models / "lenvm", seq.tolist())
    assert torch.allclose(torch.sigmoid(z_seq).double(), full, atol=1e-5)
    for i, s in enumerate(states.tolist()):
        for j, x in enumerate(cands[i].tolist()):
            want = lenvm_p(models / "lenvm", seq[:s + 1].tolist() + [x])[-1]
            assert torch.sigmoid(z[i, j]).item() == pytest.approx(want.item(), abs=1e-5)
    assert h.shape == (3, 64)


def test_distilled_oracle_head_reproduces_star_values(models, tmp_path):
    """Trained through `python -m sglang_lenvm.train --candidate-head`; held-out text is other
    random completions. Tolerance: mean |p_head - p_star| < 0.02 and the longest/shortest
    candidate agree on >= 90% of held-out states; the untrained start does far worse."""
    from sglang_lenvm import train

    _records(tmp_path / "train.jsonl", 60, seed=1)
    _records(tmp_path / "val.jsonl", 20, seed=2)
    out = tmp_path / "head"
    argv = ["--candidate-head", "--lenvm", str(models / "oracle"), "--base", str(models / "cbase"),
            "--data", str(tmp_path / "train.jsonl"), "--val-data", str(tmp_path / "val.jsonl"),
            "--output", str(out), "--top-k", "8", "--positions", "8", "--epochs", "300",
            "--lr", "3e-3", "--teacher-cache", str(tmp_path / "teacher.pt")]
    summary = train.main(argv)
    # a refit from the cached teacher values is the same fit
    assert train.main(argv)["held_out"] == summary["held_out"]
    held = summary["held_out"]
    assert held["mae_p"] < 0.02, summary
    assert held["argmax_agreement"] >= 0.9 and held["argmin_agreement"] >= 0.9, summary
    assert summary["held_out_at_start"]["mae_p"] > 5 * held["mae_p"], summary
    assert (out / "candidate_head.safetensors").is_file()
    from sglang_lenvm.checkpoint import load_candidate_head_tensors

    assert load_candidate_head_tensors(str(out), 64) is not None
