"""Fault isolation: no exception in LenVM code stops the scheduler or changes a batch-mate.

Every LenVM phase on the scheduler path runs through `isolated`: the batched call first; if it
raises, each row alone; a row that still fails is `quarantine`d. A quarantined request:
- samples unguided from then on (SGLang's own min/max_new_tokens keep the at_least floor and
  the at_most cap, which need no LenVM), its value trace stops;
- is never inserted into the radix cache (`skip_radix_cache_insert`): its LenVM mirror may
  have a hole, and a later request sharing the prefix must not read it;
- reports why, as `lenvm_fault` in its meta_info and a `warning` in `length_control`.

Fault injection, for tests only: with SGLANG_LENVM_INJECT_FAULTS="phase[,phase...]" in the
server's environment, `inject(phase, rids)` raises for any request whose rid contains
"lenvm-fault-<phase>". Phases: admit, build, filter, merge, mirror, star, decision, outputs.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, List, Optional, Sequence

from sglang_lenvm.runtime.attached import fault_of

logger = logging.getLogger(__name__)

FAULT_KEY = "lenvm_fault"  # per-token customized_info: the reason, at the token it happened
PHASES = ("admit", "build", "filter", "merge", "mirror", "star", "decision", "outputs")
ENV_VAR = "SGLANG_LENVM_INJECT_FAULTS"
_injected = frozenset(p.strip() for p in os.environ.get(ENV_VAR, "").split(",") if p.strip())
counters = {"faults": 0, "quarantined_requests": 0}


class InjectedFault(RuntimeError):
    pass


def inject(phase: str, rids: Sequence[Optional[str]]) -> None:
    """Raise if fault injection is on for `phase` and one of `rids` asks for it."""
    if phase in _injected:
        mark = f"lenvm-fault-{phase}"
        if any(rid is not None and mark in rid for rid in rids):
            raise InjectedFault(f"injected fault in phase {phase!r}")


def quarantine(req, phase: str, error: BaseException) -> None:
    """Stop LenVM work for one request for good; it goes on unguided and uncached."""
    if req is None or fault_of(req) is not None:
        return
    message = f"LenVM {phase} failed ({type(error).__name__}: {error})"
    req.lenvm_fault = message
    req.skip_radix_cache_insert = True
    info = req.customized_info
    if info is None:
        info = req.customized_info = {}
    # At the index of the token this step produces (output_ids may lag it by one under overlap
    # scheduling; either way it is a token not streamed yet).
    info[FAULT_KEY] = [None] * len(req.output_ids) + [message]
    counters["quarantined_requests"] += 1
    logger.warning("request %s: %s; it continues without length guidance", req.rid, message)


def isolated(phase: str, reqs: Sequence, batched: Callable[[], object],
             per_row: Callable[[int], object]):
    """Run `batched()`; if it raises, `per_row(i)` for every row, quarantining rows that fail.

    Returns ("batch", result) or ("rows", [result or None per row]). Never raises.
    """
    try:
        return "batch", batched()
    except Exception as error:  # noqa: BLE001 - any failure is isolated, then reported
        counters["faults"] += 1
        logger.warning("LenVM %s failed for a batch of %d; retrying row by row (%s: %s)",
                       phase, len(reqs), type(error).__name__, error)
    results: List[object] = []
    for i, req in enumerate(reqs):
        try:
            results.append(per_row(i))
        except Exception as error:  # noqa: BLE001
            logger.exception("LenVM %s failed for request %s", phase,
                             getattr(req, "rid", None))
            quarantine(req, phase, error)
            results.append(None)
    return "rows", results


def fallback(phase: str, batched: Callable[[], object], recover: Callable[[], object]):
    """`batched()`, or `recover()` if it raises (for phases whose recovery is a rebuild)."""
    try:
        return batched()
    except Exception as error:  # noqa: BLE001
        counters["faults"] += 1
        logger.warning("LenVM %s failed (%s: %s); rebuilding row by row", phase,
                       type(error).__name__, error)
        return recover()


def guarded(phase: str, fn: Callable[[], object], reqs: Sequence = (), default=None):
    """Run `fn()`; on an exception quarantine every request in `reqs` and return `default`.

    For the few places that have no per-row form (the last line of defence of each hook).
    """
    try:
        return fn()
    except Exception as error:  # noqa: BLE001
        counters["faults"] += 1
        logger.exception("LenVM %s failed; %d request(s) continue without length guidance",
                         phase, len(reqs))
        for req in reqs:
            quarantine(req, phase, error)
        return default
