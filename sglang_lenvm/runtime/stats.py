"""LenVM counters and pool occupancy, reported in /server_info and GET /lenvm/stats."""

from __future__ import annotations


def worker_stats(worker, scheduler) -> dict:
    allocator = worker.target.token_to_kv_pool_allocator
    return {
        "lenvm_path": worker.config.lenvm_path,
        "gamma": worker.gamma,
        "default_top_k": worker.config.top_k,
        **worker.stats,
        "kv_pool_tokens": int(worker.runner.max_total_num_tokens),
        "kv_bytes_per_token": worker.kv_bytes_per_token(),
        # The LenVM shares SGLang's allocator, so its free slots are SGLang's.
        "free_slots": int(allocator.available_size()),
        "evictable_slots": int(scheduler.tree_cache.evictable_size()),
        "running_requests": len(scheduler.running_batch.reqs),
    }
