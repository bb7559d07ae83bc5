"""A test-time guard: does LenVM code make the host wait for the device during a step?

On a GPU, every `.item()`, `.tolist()`, `bool(tensor)` or boolean-mask index in the per-step
path stalls the CPU until the device queue has drained, and every `torch.tensor(python list)`
is a host-to-device copy from pageable memory: the scheduler's overlap of CPU work with the
GPU forward is lost. A CPU run cannot see the stall, so the guard looks at the calls instead.

With SGLANG_LENVM_SYNC_GUARD=1 in the server's environment, the step's LenVM hooks (scoring,
outputs) run under a TorchFunctionMode that counts such calls made from sglang_lenvm code
(SGLang's own code is what plain decoding pays too): `host_syncs` in /lenvm/stats, and a
warning naming the line the first time a line does it. The functions in ALLOWED do it by
design, each for the reason given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

ENV_VAR = "SGLANG_LENVM_SYNC_GUARD"
ENABLED = os.environ.get(ENV_VAR, "") not in ("", "0")

# Calls that wait for the device, or copy Python data to it.
SYNC_CALLS = frozenset({"tensor", "as_tensor", "tolist", "item", "__bool__", "__int__",
                        "__float__", "__index__", "cpu", "numpy", "nonzero", "masked_select",
                        "unique"})
# Indexing with a boolean mask has a data-dependent shape (a nonzero on the device).
INDEX_CALLS = frozenset({"__getitem__", "__setitem__", "index_put_", "index_put"})

ALLOWED = {
    "_host_max": "reads the host copy of seq_lens (SGLang keeps one for this)",
    "_equal_stop_near": "reads host copies of seq_lens and of the equal stop lengths",
    "_drop_unused_slots": "CPU path only; the GPU path keeps all K slots instead",
    "memo_tensor": "fills a per-batch memo: once per batch composition, not per step",
    "_valid_positions": "CPU path only; the GPU path packs by host-known counts instead",
}

_PACKAGE = str(Path(__file__).resolve().parents[1])  # sglang_lenvm/
_KERNELS = str(Path(__file__).resolve().parents[2] / "kernels")
_TORCH = str(Path(torch.__file__).resolve().parent)

counters = {"host_syncs": 0}
_reported: set = set()


def _ours(filename: str) -> bool:
    return filename.startswith(_PACKAGE) or filename.startswith(_KERNELS)


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS or (name in INDEX_CALLS and _bool_index(args)):
            self._check(name)
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _check(name: str) -> None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
            frame = frame.f_back
        if frame is None or not _ours(str(Path(frame.f_code.co_filename).resolve())):
            return
        if frame.f_code.co_name in ALLOWED:
            return
        counters["host_syncs"] += 1
        where = f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
        if where not in _reported:
            _reported.add(where)
            logger.warning("LenVM host sync in the step path: %s at %s", name, where)


def guarded_step():
    """The context a step's LenVM hook runs in: the guard with SGLANG_LENVM_SYNC_GUARD=1."""
    return HostSyncGuard() if ENABLED else contextlib.nullcontext()
