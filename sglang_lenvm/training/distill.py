"""A trained LenVM's values as another LenVM's regression targets (`train --teacher LENVM`).

Trained on Monte Carlo returns, a LenVM fits at every state the return of one sampled
continuation, G_t = -(1 - gamma^(L-t)). That is an unbiased but very noisy target: this
project's 135M demo model gives one prompt lengths from 11 to 512 (docs/training.md). A
trained LenVM's value at the same state estimates the mean of that return, so a cheaper
LenVM (`--num-layers`) can be fitted to it instead, and learns from each completion what the
teacher learned from all of its own. The student can then match the teacher, not beat it.

The teacher's value does not depend on where a text was cut, so completions cut by max_tokens
need no censoring: every state in the text gets the teacher's value as its target.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from sglang_lenvm.training.data import Example

logger = logging.getLogger(__name__)


@torch.no_grad()
def teacher_values(examples: Sequence[Example], lenvm_path: str, *, batch_size: int = 16,
                   device: str = "cpu", progress: bool = True) -> list[torch.Tensor]:
    """V(s_t) = -sigmoid(z) of the LenVM at `lenvm_path` for each example's supervised
    states s_start .. s_start + n_supervised - 1 (float32, on the CPU).

    Batches are length-sorted and right-padded; with no padding mask the backbone runs
    causally, so a real token never sees the pads after it."""
    from tqdm import tqdm

    from sglang_lenvm.training.candidate_head import load_teacher

    backbone, head = load_teacher(lenvm_path)
    backbone.to(device)
    head.to(device)
    vocab = backbone.config.vocab_size
    out: list[Optional[torch.Tensor]] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    with tqdm(total=len(order), desc="teacher values", unit="seq", disable=not progress) as bar:
        for k in range(0, len(order), batch_size):
            idx = order[k: k + batch_size]
            seqs = [torch.tensor(examples[i].input_ids) for i in idx]
            if max(int(s.max()) for s in seqs) >= vocab:
                raise ValueError(f"a token id is outside the teacher's vocabulary ({vocab}): "
                                 f"the teacher must share the base model's tokenizer")
            ids = pad_sequence(seqs, batch_first=True).to(device)
            z = head(backbone(input_ids=ids).last_hidden_state)
            v = -torch.sigmoid(z.float()).cpu()
            for row, i in enumerate(idx):
                e = examples[i]
                out[i] = v[row, e.start: e.start + e.n_supervised].clone()
            bar.update(len(idx))
    return out  # type: ignore[return-value]


def _fingerprint(examples: Sequence[Example]) -> str:
    """Identifies the token sequences and supervised spans the values belong to."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt_id, e.start, e.n_supervised, e.input_ids]).encode())
    return h.hexdigest()


def attach_teacher(examples: Sequence[Example], lenvm_path: str, *,
                   cache: Optional[str] = None, **kw) -> None:
    """Set `teacher` on every example (collate then uses it as the target). `cache` keeps the
    values in a file, reused only for the same teacher and the same token sequences."""
    key = {"teacher": str(Path(lenvm_path).resolve()), "examples": _fingerprint(examples)}
    values = None
    if cache and Path(cache).is_file():
        saved = torch.load(cache)
        if saved.get("key") == key:
            values = saved["values"]
            logger.info("teacher values from %s", cache)
        else:
            logger.info("%s holds another teacher's or other data's values: recomputing", cache)
    if values is None:
        values = teacher_values(examples, lenvm_path, **kw)
        if cache:
            torch.save({"key": key, "values": values}, cache)
    for e, v in zip(examples, values):
        e.teacher = v
