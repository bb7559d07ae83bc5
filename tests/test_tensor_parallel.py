"""The TP agreement (runtime/tensor_parallel.py) on two real gloo processes: ranks that sampled
different tokens take the smallest, the disagreement is counted, and a request quarantined on
one rank is quarantined on both. (The server-level tests at tp 2 are in test_parallel.py.)"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_lenvm.testing.server_process import free_port


class _Group:
    """The two members of SGLang's GroupCoordinator the agreement uses, over plain gloo."""

    cpu_group = None  # the default (world) group

    def all_gather(self, t, dim=0):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=dim)


def _rank(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from sglang_lenvm.runtime.tensor_parallel import Agreement

        tp = Agreement(2, rank, _Group())
        ids = torch.tensor([5, 7, 9]) if rank == 0 else torch.tensor([5, 3, 9])
        tp.agree_on_tokens(ids)
        tp.agree_on_tokens(torch.tensor([1, 2]))  # an agreeing step adds nothing
        reqs = [types.SimpleNamespace(rid=r, output_ids=[1], customized_info=None)
                for r in ("a", "b", "c")]
        if rank == 1:
            reqs[1].lenvm_fault = "LenVM star failed (on rank 1 only)"
        tp.agree_on_faults([reqs[0], None, reqs[1], reqs[2]])
        tp.agree_on_faults(reqs)  # nothing new: one all-reduce, no gather
        stats = tp.stats()
        gathered = tp.gather_stats({"tp_rank": rank})
        queue.put((rank, ids.tolist(), [getattr(r, "lenvm_fault", None) for r in reqs],
                   stats, gathered))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_tokens_and_faults():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        ids, fault_reasons, stats, gathered = results[rank]
        assert ids == [5, 3, 9]
        assert stats == {"tp_size": 2, "tp_token_disagreements": 1}
        assert fault_reasons[0] is None and fault_reasons[2] is None
        assert gathered == [{"tp_rank": 0}, {"tp_rank": 1}]
    assert "rank 1 only" in results[1][1][1]
    assert "another tensor-parallel rank" in results[0][1][1]


def test_a_single_rank_does_nothing():
    from sglang_lenvm.runtime.tensor_parallel import Agreement

    tp = Agreement(1, 0, group=object())
    ids = torch.tensor([4, 2])
    tp.agree_on_tokens(ids)
    tp.agree_on_faults([types.SimpleNamespace(rid="a", lenvm_fault="x")])
    assert ids.tolist() == [4, 2] and tp.stats()["tp_token_disagreements"] == 0
    assert tp.gather_stats({"x": 1}) == [{"x": 1}]


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
