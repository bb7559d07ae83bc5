"""Reading a test server's LenVM counters and waiting for its pools to be idle."""

import time


def stats(server):
    return server.get("/lenvm/stats").json()[0]


def all_stats(server) -> list:
    """One entry per scheduler (data-parallel rank)."""
    return server.get("/lenvm/stats").json()


def _idle(s) -> bool:
    """A scheduler and every one of its tensor-parallel ranks (same pool size on each)."""
    return all(t["running_requests"] == 0 and t["waiting_requests"] == 0
               and t["protected_slots"] == 0
               and t["free_slots"] + t["evictable_slots"] == s["kv_pool_tokens"]
               for t in [s, *s["tp_ranks"]])


def wait_idle(server, timeout=60):
    """On every rank (DP and TP): no request running or waiting, and every slot free or held
    unlocked by the cache. Returns the first rank's stats."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        every = all_stats(server)
        if all(_idle(s) for s in every):
            return every[0]
        time.sleep(0.5)
    raise AssertionError(f"not idle after {timeout}s: {all_stats(server)}")
