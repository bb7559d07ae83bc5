"""Independent reference: a plain transformers forward of a LenVM checkpoint + its value head."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from sglang_lenvm.checkpoint import load_head_tensors


@functools.lru_cache(maxsize=8)
def _load(path: str):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    head = {k: v.float() for k, v in load_head_tensors(path).items()}
    return model, head


def lenvm_p(path: str | Path, token_ids: list[int]) -> torch.Tensor:
    """p = sigmoid(v_head(h_t)) for every position t of the sequence (float64)."""
    model, head = _load(str(path))
    with torch.no_grad():
        h = model(torch.tensor([token_ids])).last_hidden_state[0].float()
        a = torch.nn.functional.silu(h @ head["v_head.fc.weight"].T + head["v_head.fc.bias"])
        z = a @ head["v_head.summary.weight"].T + head["v_head.summary.bias"]
    return torch.sigmoid(z[:, 0].double())


def trace_reference(path, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Expected `lenvm_p`: p(s_t) for t = 0..L-1, s_0 = the last prompt token."""
    p = lenvm_p(path, prompt_ids + output_ids)
    P = len(prompt_ids)
    return p[P - 1: P - 1 + len(output_ids)]


def candidate_p(path: str | Path, token_ids: list[int], cand_ids: list[int]) -> torch.Tensor:
    """One-pass reference: sigmoid(c_head(h, e(x))) for candidates x after `token_ids`, with
    h the last position's final hidden state and e the LenVM's input embedding (float64)."""
    from safetensors.torch import load_file

    model, _ = _load(str(path))
    c = {k: v.float() for k, v in load_file(str(Path(path) / "candidate_head.safetensors")).items()}
    with torch.no_grad():
        h = model(torch.tensor([token_ids])).last_hidden_state[0, -1].float()
        e = model.get_input_embeddings()(torch.tensor(cand_ids)).float()
        a = torch.nn.functional.silu(h @ c["c_head.state.weight"].T + c["c_head.state.bias"]
                                     + e @ c["c_head.token.weight"].T)
        z = a @ c["c_head.summary.weight"].T + c["c_head.summary.bias"]
    return torch.sigmoid(z[:, 0].double())
