"""Reading a test server's LenVM counters and waiting for its pools to be idle."""

import time


def stats(server):
    return server.get("/lenvm/stats").json()[0]


def all_stats(server) -> list:
    """One entry per scheduler (data-parallel rank)."""
    return server.get("/lenvm/stats").json()


def _idle(s) -> bool:
    return (s["running_requests"] == 0 and s["waiting_requests"] == 0
            and s["protected_slots"] == 0
            and s["free_slots"] + s["evictable_slots"] == s["kv_pool_tokens"])


def wait_idle(server, timeout=60):
    """On every rank: no request running or waiting, and every slot free or held unlocked by
    the cache. Returns the first rank's stats."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        every = all_stats(server)
        if all(_idle(s) for s in every):
            return every[0]
        time.sleep(0.5)
    raise AssertionError(f"not idle after {timeout}s: {all_stats(server)}")
