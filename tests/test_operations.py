"""What operators look at: the LenVM on SGLang's Prometheus endpoint (the session server runs
with --enable-metrics), and an idle server that is idle."""

from __future__ import annotations

import time

import psutil

from pools import stats, wait_idle

from benchmarks.client import lenvm_metrics


def test_lenvm_counters_and_step_times_on_prometheus(server):
    r = server.post("/generate", {"text": "Metrics, please.", "sampling_params": {
        "max_new_tokens": 6, "length_target": 6, "length_mode": "equal"}})
    assert r.status_code == 200, r.text
    wait_idle(server)
    m, s = lenvm_metrics(server.url), stats(server)
    # The counters are those of /lenvm/stats, synced after each step.
    for name in ("star_forwards", "candidates_scored", "mirror_extend_tokens", "star_rows"):
        assert m[(f"sglang:lenvm_{name}_total", None)] == s[name], name
    # One scoring observation per guided step at least (this request had 6), all timed.
    assert m[("sglang:lenvm_step_seconds_count", "scoring")] >= 6
    assert m[("sglang:lenvm_step_seconds_sum", "scoring")] > 0
    assert m[("sglang:lenvm_step_seconds_count", "mirror")] >= 1


def test_an_idle_server_does_not_spin(server):
    """The CPU defaults add SGLang's --sleep-on-idle: an idle scheduler blocks in zmq's poll
    instead of polling in a loop (one core at 100% without it)."""
    wait_idle(server)
    procs = psutil.Process(server.proc.pid).children(recursive=True)
    (scheduler,) = [p for p in procs if "scheduler" in " ".join(p.cmdline()) + p.name()]
    time.sleep(1.0)  # the last request's bookkeeping
    before, tic = sum(scheduler.cpu_times()[:2]), time.monotonic()
    time.sleep(4.0)
    used = sum(scheduler.cpu_times()[:2]) - before
    assert used < 0.25 * (time.monotonic() - tic), f"{used:.2f} CPU seconds in 4 s idle"
    r = server.post("/generate", {"text": "awake?", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text
