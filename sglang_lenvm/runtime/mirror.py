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
    rows not mirrored). Rows whose mirror fails are quarantined."""
    rows = [i for i, a in enumerate(state.active) if a and fault_of(state.reqs[i]) is None]
    n = forward_batch.batch_size
    last_z = torch.full((n,), float("nan"), dtype=torch.float32,
                        device=forward_batch.input_ids.device)
    forward_batch.lenvm_last_z = last_z
    if not rows:
        return

    def run(sub):
        faults.inject("mirror", state.rids(sub))
        return worker.mirror_extend(forward_batch, None if len(sub) == n else sub)

    how, result = faults.isolated("mirror", [state.reqs[i] for i in rows],
                                  lambda: run(rows), lambda j: run([rows[j]]))
    if how == "batch":
        last_z[torch.tensor(rows, dtype=torch.int64).to(last_z.device)] = result.float()
        return
    for i, z in zip(rows, result):
        if z is not None:
            last_z[i] = z[0].float()
