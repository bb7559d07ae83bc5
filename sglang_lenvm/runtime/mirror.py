"""The LenVM's KV mirror for prefill batches: the same tokens into the same slots.

After the base model's prefill (EXTEND) forward, the LenVM runs over the new tokens of the rows
that use it, and only those: an unguided request batched with a guided one costs the LenVM
nothing. Intermediate chunks of a chunked prefill are mirrored too (later chunks attend to
them) but not scored (scorer.scoring_rows). Decode steps mirror inside the star forward.
"""

from __future__ import annotations

import torch

from sglang_lenvm.runtime import faults
from sglang_lenvm.runtime.attached import fault_of


def mirror_prefill(worker, forward_batch, state) -> None:
    """Sets forward_batch.lenvm_last_z: [bs] raw value at each row's last new token (NaN for
    rows not mirrored), and with one-pass scoring forward_batch.lenvm_last_h: [bs, H] the
    hidden state there (the candidate head reads it). Rows whose mirror fails are
    quarantined."""
    rows = [i for i, a in enumerate(state.active) if a and fault_of(state.reqs[i]) is None]
    n = forward_batch.batch_size
    device = forward_batch.input_ids.device
    last_z = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    forward_batch.lenvm_last_z = last_z
    last_h = None
    if worker.candidate_head is not None:
        hidden = worker.model_config.hidden_size
        last_h = torch.full((n, hidden), float("nan"), dtype=torch.float32, device=device)
        forward_batch.lenvm_last_h = last_h
    if not rows:
        return

    def run(sub):
        faults.inject("mirror", state.rids(sub))
        return worker.mirror_extend(forward_batch, None if len(sub) == n else sub)

    how, result = faults.isolated("mirror", [state.reqs[i] for i in rows],
                                  lambda: run(rows), lambda j: run([rows[j]]))
    if how == "batch":
        done, hidden = torch.tensor(rows, dtype=torch.int64).to(device), result
    else:
        ok = [(i, h) for i, h in zip(rows, result) if h is not None]
        if not ok:
            return
        done = torch.tensor([i for i, _ in ok], dtype=torch.int64).to(device)
        hidden = torch.cat([h for _, h in ok])
    last_z[done] = worker.model.v_head(hidden).float()
    if last_h is not None:
        last_h[done] = hidden.float()
