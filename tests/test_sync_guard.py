"""No host-device synchronisation in the per-step LenVM path (runtime/sync_guard.py).

The guard itself is checked on code compiled as if it were a file of the package (it must
count what it is there to count, and nothing else); then the session's servers, which run with
the guard on, serve guided requests of every kind and must report no host sync at all.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from sglang_lenvm.runtime import sync_guard

PACKAGE = Path(sync_guard.__file__).resolve().parents[1]


def _run_as_package_code(source: str, name: str = "step", filename: str = "fake_step.py"):
    """Define `name(t)` from `source` with a filename inside sglang_lenvm/, call it under the
    guard and return how many host syncs were counted."""
    scope: dict = {"torch": torch}
    exec(compile(f"def {name}(t):\n    {source}\n", str(PACKAGE / filename), "exec"), scope)
    before = sync_guard.counters["host_syncs"]
    with sync_guard.HostSyncGuard():
        scope[name](torch.arange(4.0))
    return sync_guard.counters["host_syncs"] - before


@pytest.mark.parametrize("source", [
    "t.sum().item()", "t.tolist()", "bool(t[0] > 0)", "int(t.max())", "float(t[1])",
    "torch.tensor([1, 2])", "t[t > 1]", "t.nonzero()", "t.cpu()",
    "t.masked_fill_(t > 1, 0.0)[t > 2]",
])
def test_the_guard_counts_host_syncs_in_our_code(source):
    assert _run_as_package_code(source) == 1


@pytest.mark.parametrize("source", [
    "torch.where(t > 1, t, t * 2).sum()", "t[1:3] * 2",
    "t.masked_fill(t > 1, 0.0)", "torch.full((2,), float('-inf'))", "t.shape[0] + 1",
])
def test_device_side_work_is_not_counted(source):
    assert _run_as_package_code(source) == 0


def test_allowed_functions_and_other_code_are_not_counted():
    assert _run_as_package_code("t.tolist()", name="_host_max") == 0
    before = sync_guard.counters["host_syncs"]
    with sync_guard.HostSyncGuard():
        torch.arange(3.0).tolist()  # this file is not the package's code
    assert sync_guard.counters["host_syncs"] == before


def test_a_steady_batch_indexes_without_a_copy():
    """The step's row index is made once per state, then reused; a new state (filter or
    merge) starts its own."""
    from sglang_lenvm.runtime.length_state import LengthState, Settings

    state = LengthState.empty(3, Settings(device=torch.device("cpu"), default_top_k=5,
                                          max_top_k=64))
    first = state.device_index([0, 2])
    assert first.tolist() == [0, 2] and state.device_index([0, 2]) is first
    assert state.device_index([1]).tolist() == [1]
    again = state._index([0, 1], torch.tensor([0, 1]))
    assert again.device_index([0, 2]) is not first


def _mixed_batch(server, bodies):
    with ThreadPoolExecutor(len(bodies)) as ex:
        for r in ex.map(lambda b: server.post("/generate", b), bodies):
            assert r.status_code == 200, r.text


def _host_syncs(server):
    (stats,) = server.get("/lenvm/stats").json()
    assert stats["host_syncs"] is not None, "the server runs without the guard"
    return stats["host_syncs"]


def _bodies(text, eos, top_k):
    def body(**lc):
        return {"text": text, "sampling_params": {"max_new_tokens": 24, "temperature": 1.0,
                                                  "top_k": top_k, **lc}}
    return [body(length_target=6, length_mode="equal"),
            body(length_target=6, length_mode="equal", temperature=0.0),
            body(length_target=4, length_mode="equal", logit_bias={str(eos): -30.0}),
            body(length_target=5, length_mode="at_most"),
            body(length_target=9, length_mode="at_least"),
            body(beta=-2.0),
            body(return_length_values=True),
            {**body(length_target=7), "sampling_params": {
                **body(length_target=7)["sampling_params"], "n": 2}},
            body()]  # unguided batch-mate


def test_no_host_sync_in_guided_steps(server):
    _mixed_batch(server, _bodies("Hello there", eos=0, top_k=8))
    assert _host_syncs(server) == 0


def test_no_host_sync_in_guided_steps_oracle(oracle_server):
    """Every token a candidate (top-k 48), equal's stop slot past its overshoot limit."""
    _mixed_batch(oracle_server, _bodies("abc", eos=2, top_k=48))
    assert _host_syncs(oracle_server) == 0
