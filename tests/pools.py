"""Reading a test server's LenVM counters and waiting for its pools to be idle."""

import time


def stats(server):
    return server.get("/lenvm/stats").json()[0]


def wait_idle(server, timeout=60):
    """No request running or waiting, and every slot free or held unlocked by the cache."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = stats(server)
        if (s["running_requests"] == 0 and s["waiting_requests"] == 0 and s["protected_slots"] == 0
                and s["free_slots"] + s["evictable_slots"] == s["kv_pool_tokens"]):
            return s
        time.sleep(0.5)
    raise AssertionError(f"not idle after {timeout}s: {stats(server)}")
