"""Tensor parallelism: the LenVM is sharded over the base model's TP group, and ranks agree.

Under `--tp-size N` every rank runs the same scheduler loop on the same batches: its shard of
the base model, its shard of the LenVM (built in the same parallel context, as SGLang builds
a draft model), its own mirror of the shared slot layout. The LenVM's final hidden state is
the output of an all-reduce, so every rank scores the same values and takes the same
decision; nothing here recomputes them.

What can still make ranks differ is what SGLang itself guards against for grammar-constrained
batches: a kernel that is not bitwise deterministic, and, ours alone, a LenVM fault (an
exception isolated on one rank quarantines a request there only; the next star forward would
then run different rows on different ranks and its collectives would not match). So, on steps
with LenVM rows only:
- `agree_on_tokens`: every rank takes the smallest id any rank sampled for a row (SGLang's own
  rule for grammars) and counts the rows where ranks disagreed, on the device (no host sync);
- `agree_on_faults`: a request quarantined on any rank is quarantined on all of them.

Everything else (a fault in the middle of a sharded forward, between two of its collectives)
is out of reach of a per-step agreement; faults there are deterministic in practice (the same
inputs on every rank), and the fault-injection tests exercise them at tp 2.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from sglang_lenvm.runtime import faults
from sglang_lenvm.runtime.attached import fault_of


class Agreement:
    """Per-scheduler TP state: the group and the disagreement counter (a device tensor)."""

    def __init__(self, size: int, rank: int, group=None):
        """`group`: SGLang's GroupCoordinator of the TP group (`all_gather` on the device
        group, `cpu_group` for gloo); None at tp 1."""
        self.size, self.rank = size, rank
        self.group = group if size > 1 else None
        self.disagreements: Optional[torch.Tensor] = None  # rows, summed over steps

    @classmethod
    def current(cls) -> "Agreement":
        """For the TP group of the process being built (the scheduler's)."""
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        return cls(parallel.tp_size, parallel.tp_rank, parallel.tp_group)

    def agree_on_tokens(self, next_ids: torch.Tensor) -> None:
        """In place: each row's id becomes the smallest any rank sampled."""
        if self.group is None or next_ids.numel() == 0:
            return
        every = self.group.all_gather(next_ids.reshape(1, -1), dim=0)  # [tp, B]
        low, high = every.min(dim=0).values, every.max(dim=0).values
        differ = (low != high).sum()
        self.disagreements = differ if self.disagreements is None else self.disagreements + differ
        next_ids.copy_(low.view_as(next_ids))

    def agree_on_faults(self, reqs: Sequence) -> None:
        """Quarantine on this rank every request some rank quarantined (one small gloo
        all-reduce per step; a second collective only on a step where some rank faulted)."""
        if self.group is None:
            return
        import torch.distributed as dist

        mine = [r.rid for r in reqs if r is not None and fault_of(r) is not None]
        count = torch.tensor([len(mine)], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=self.group.cpu_group)
        if int(count) == 0:
            return
        everyone: list = [None] * self.size
        dist.all_gather_object(everyone, mine, group=self.group.cpu_group)
        faulted = {rid for rids in everyone for rid in rids}
        for req in reqs:
            if req is not None and req.rid in faulted and fault_of(req) is None:
                faults.quarantine(req, "tensor_parallel",
                                  RuntimeError("quarantined on another tensor-parallel rank"))

    def stats(self) -> dict:
        return {"tp_size": self.size,
                "tp_token_disagreements": int(self.disagreements)
                if self.disagreements is not None else 0}

    def gather_stats(self, own: Optional[dict]) -> list:
        """Every TP rank's stats, on every rank (called by all ranks in the same control
        request: SGLang broadcasts control requests to the whole TP group)."""
        if self.group is None:
            return [own]
        import torch.distributed as dist

        everyone: list = [None] * self.size
        dist.all_gather_object(everyone, own, group=self.group.cpu_group)
        return everyone
