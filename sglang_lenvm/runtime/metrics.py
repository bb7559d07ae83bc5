"""The LenVM on SGLang's Prometheus endpoint (`--enable-metrics`, GET /metrics).

SGLang runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR is set before the
scheduler process starts), so metrics created here, in the scheduler, are served by the HTTP
server's /metrics with SGLang's own. Exported, labelled with model_name, tp_rank and dp_rank:

- `sglang:lenvm_step_seconds{phase}` (histogram): host wall time of the LenVM's part of a step,
  phase "mirror" (the prefill mirror) or "scoring" (candidates, star forward, decision). On a
  GPU it ends when the host has queued the work (the step's later sync waits for it), so it
  is the LenVM's CPU cost there; on a CPU it is its whole cost.
- `sglang:lenvm_<counter>_total`: the counters of GET /lenvm/stats (star forwards, candidates
  scored, mirrored tokens, faults, quarantined requests), synced after each step.

Without --enable-metrics nothing here is created and a step pays one `is None` check.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Dict

logger = logging.getLogger(__name__)

# Seconds: from a fraction of a millisecond (GPU launch cost) to a CPU star forward of a batch.
STEP_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0)


class LenVMMetrics:
    def __init__(self, model_name: str, tp_rank: int, dp_rank: int):
        from prometheus_client import Histogram

        self.labels = {"model_name": model_name, "tp_rank": str(tp_rank), "dp_rank": str(dp_rank)}
        self.step_seconds = Histogram(
            "sglang:lenvm_step_seconds", "Host wall time of the LenVM's part of a step.",
            labelnames=["phase", *self.labels], buckets=STEP_BUCKETS)
        self._counters: Dict[str, object] = {}
        self._exported: Dict[str, int] = {}

    @contextmanager
    def time_phase(self, phase: str):
        tic = time.perf_counter()
        yield
        seconds = time.perf_counter() - tic
        try:
            self.step_seconds.labels(phase=phase, **self.labels).observe(seconds)
        except Exception:  # noqa: BLE001 - a metrics failure must not reach the scheduler
            logger.exception("LenVM step-time metric failed")

    def sync(self, counts: Dict[str, int]) -> None:
        """Advance each Prometheus counter to the current value of our counter of that name."""
        from prometheus_client import Counter

        for name, value in counts.items():
            delta = value - self._exported.get(name, 0)
            if delta <= 0:
                continue
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Counter(
                    f"sglang:lenvm_{name}", f"LenVM counter {name} (as in GET /lenvm/stats).",
                    labelnames=list(self.labels)).labels(**self.labels)
            counter.inc(delta)
            self._exported[name] = value
