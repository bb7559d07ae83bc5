"""LenVM counters and pool occupancy, reported in /server_info and GET /lenvm/stats.

The LenVM allocates no KV slots of its own: its pool is indexed by SGLang's shared allocator
and slot table, so "idle" for the LenVM is exactly SGLang's idle state: every slot either free
or held (evictable, unlocked) by the radix cache, and no request running or waiting.
"""

from __future__ import annotations

import math

from sglang_lenvm.runtime import faults, sync_guard


def worker_stats(worker, scheduler) -> dict:
    from sglang.srt.runtime_context import get_parallel

    allocator = worker.target.token_to_kv_pool_allocator
    cache = scheduler.tree_cache
    parallel = get_parallel()
    return {
        "dp_rank": parallel.dp_rank or 0,
        "tp_rank": parallel.tp_rank,
        "lenvm_path": worker.config.lenvm_path,
        "gamma": worker.gamma,
        "default_top_k": worker.config.top_k,
        "scoring": worker.scoring,  # "star" or "one-pass" (--lenvm-scoring)
        "trunk_layers": worker.trunk,  # leading layers shared with the base model (one-pass)
        "equal_distance": worker.config.equal_distance,
        # JSON has no infinity: null means `equal` is never stopped past its target.
        "equal_max_overshoot": (worker.config.equal_max_overshoot
                                if math.isfinite(worker.config.equal_max_overshoot) else None),
        "plausibility": worker.config.plausibility,
        "at_least_end_pull": worker.config.at_least_end_pull,
        # null: inf, the deterministic closest candidate
        "equal_softness": (worker.config.equal_softness
                           if math.isfinite(worker.config.equal_softness) else None),
        # null: inf, only candidates predicted to fit (the hard rule)
        "at_most_softness": (worker.config.at_most_softness
                             if math.isfinite(worker.config.at_most_softness) else None),
        # at_most: the stop token's boost right after a sentence end (1: none)
        "at_most_end_boost": worker.config.at_most_end_boost,
        # equal: how much more a predicted undershoot counts than an overshoot (1: the same)
        "equal_undershoot": worker.config.equal_undershoot,
        # guided rows: no token n-gram of this many tokens more than repeat_limit times (0: off)
        "repeat_ngram": worker.config.repeat_ngram,
        "repeat_limit": worker.config.repeat_limit,
        # "on": sentence ends count as 1 token from the end (equal, at_most; sentence_end.py)
        "sentence_end": worker.config.sentence_end,
        **worker.stats,
        **faults.counters,  # LenVM failures isolated, requests that went on unguided
        # calls that would stall a GPU's host in the step path (tests: sync_guard.py), or null
        "host_syncs": sync_guard.counters["host_syncs"] if sync_guard.ENABLED else None,
        "kv_pool_tokens": int(worker.runner.max_total_num_tokens),
        "kv_bytes_per_token": worker.kv_bytes_per_token(),
        "free_slots": int(allocator.available_size()),
        "evictable_slots": int(cache.evictable_size()),
        "protected_slots": int(cache.protected_size()),
        "running_requests": len(scheduler.running_batch.reqs),
        "waiting_requests": len(scheduler.waiting_queue),
        **worker.tp.stats(),
    }


# What /lenvm/stats shows of each tensor-parallel rank (all ranks share one slot layout, so
# each must come back to idle; only rank 0 answers SGLang's control requests).
TP_RANK_KEYS = ("tp_rank", "free_slots", "evictable_slots", "protected_slots",
                "running_requests", "waiting_requests", "faults", "quarantined_requests",
                "star_forwards", "tp_token_disagreements")


def tp_rank_summary(stats) -> dict:
    """One TP rank's entry (None: that rank's stats failed; the failure is in its log)."""
    return None if stats is None else {k: stats.get(k) for k in TP_RANK_KEYS}
