"""Getting LenVM results from the scheduler to the client, through SGLang's auxiliary outputs.

The scorer attaches a `LenVMDeviceOutput` to the base model's logits output; SGLang copies it to
the host with its own async device-to-host copy and calls `consume` right after the step's
tokens are committed to their requests, before streaming. We then put per-request values into
`req.customized_info`, which SGLang streams into each response's `meta_info`:

- `lenvm_p`: per output token t, the LenVM value p(s_t) of the state *before* token t
  (t = 0 is the prompt boundary); only for requests that asked for values.
- `lenvm_predicted_length`: the predicted total length at the prompt boundary (request-level,
  reported once).
- `lenvm_fallback`: per output token, True where the LenVM produced non-finite values and the
  token was sampled from the base distribution instead.
- `lenvm_p_chosen`: per output token of a steered request, the value the LenVM gave the token
  that was then sampled, p(s_t + x_t) (None where it was not a candidate); with star scoring it
  equals the next entry of `lenvm_p` (with one-pass scoring it is the candidate head's
  estimate of it), and for a last token that ended by EOS it is 0.
- `lenvm_fault` (faults.py): per output token, the reason LenVM guidance stopped, at the token
  where it did (None elsewhere).
Entries stay aligned with the output tokens: a step that reports nothing for a request (after
a fault) leaves None, never a shift.

Both halves are fault-isolated: a failure while copying or consuming quarantines the rows it
concerns (the request goes on unguided), never the scheduler.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch

from sglang_lenvm.returns import remaining_from_p
from sglang_lenvm.runtime import faults
from sglang_lenvm.runtime.faults import FAULT_KEY  # noqa: F401 - one of our meta_info keys

VALUES_KEY = "lenvm_p"
PREDICTED_KEY = "lenvm_predicted_length"
FALLBACK_KEY = "lenvm_fallback"
CHOSEN_KEY = "lenvm_p_chosen"
REQUEST_LEVEL_KEYS = frozenset({PREDICTED_KEY})


@dataclasses.dataclass(frozen=True)
class LenVMDeviceOutput:
    batch_rows: List[int]  # batch row of each entry below
    rows_device: torch.Tensor  # the same rows on the device (the step's index tensor)
    want_values: List[bool]
    p_state: torch.Tensor  # [n] value of the state before this step's token
    ok: torch.Tensor  # [n] bool, False where the row fell back to unguided sampling
    gamma: float
    cand_ids: Optional[torch.Tensor] = None  # [n, K] candidates scored this step
    p_cand: Optional[torch.Tensor] = None  # [n, K] their values
    p_chosen: Optional[torch.Tensor] = None  # [n] value of the sampled token (NaN: none)

    def with_chosen(self, next_token_ids: torch.Tensor) -> "LenVMDeviceOutput":
        """Look up the sampled token among the candidates (after SGLang's sampler ran)."""
        if self.cand_ids is None:
            return self
        hit = self.cand_ids == next_token_ids[self.rows_device].view(-1, 1)
        p = torch.where(hit, self.p_cand.float(), torch.full_like(self.p_cand.float(), -1.0))
        p = p.amax(dim=1)
        chosen = torch.where(p >= 0, p, torch.full_like(p, float("nan")))
        return dataclasses.replace(self, cand_ids=None, p_cand=None, p_chosen=chosen)

    def copy_to_host(self, copy_tensor) -> "LenVMHostOutput":
        try:
            chosen = copy_tensor(self.p_chosen) if self.p_chosen is not None else None
            return LenVMHostOutput(self.batch_rows, self.want_values, copy_tensor(self.p_state),
                                   copy_tensor(self.ok), self.gamma, chosen)
        except Exception as error:  # noqa: BLE001 - SGLang calls this: never raise into it
            faults.counters["faults"] += 1
            return LenVMHostOutput(self.batch_rows, self.want_values, None, None, self.gamma,
                                   error=error)


@dataclasses.dataclass(frozen=True)
class LenVMHostOutput:
    batch_rows: List[int]
    want_values: List[bool]
    p_state: Optional[torch.Tensor]
    ok: Optional[torch.Tensor]
    gamma: float
    p_chosen: Optional[torch.Tensor] = None
    error: Optional[BaseException] = None  # the copy failed: the rows are quarantined

    def consume(self, batch, commits) -> None:
        """Record this step's values on each request (SGLang calls it; it never raises)."""
        reqs = [batch.reqs[i] if commits[i] is not None else None for i in self.batch_rows]
        live = [j for j, r in enumerate(reqs) if r is not None]
        if self.error is not None:
            for j in live:
                faults.quarantine(reqs[j], "outputs", self.error)
            return
        try:
            p_state, ok = self.p_state.tolist(), self.ok.tolist()
            chosen = self.p_chosen.tolist() if self.p_chosen is not None else None
        except Exception as error:  # noqa: BLE001
            for j in live:
                faults.quarantine(reqs[j], "outputs", error)
            return

        def record(js):
            faults.inject("outputs", [reqs[j].rid for j in js])
            for j in js:
                self._record(reqs[j], commits[self.batch_rows[j]], j, p_state, ok, chosen)

        faults.isolated("outputs", [reqs[j] for j in live], lambda: record(live),
                        lambda k: record([live[k]]))

    def _record(self, req, commit, j, p_state, ok, chosen) -> None:
        info = req.customized_info
        if info is None:
            info = req.customized_info = {}
        n = len(commit.token_ids)
        at = commit.output_index
        if PREDICTED_KEY not in info and at == 0:
            info[PREDICTED_KEY] = [remaining_from_p(p_state[j], self.gamma)]
        if self.want_values[j]:
            _put(info, VALUES_KEY, at, [p_state[j]] + [None] * (n - 1))
            if chosen is not None:
                c = None if math.isnan(chosen[j]) else chosen[j]
                _put(info, CHOSEN_KEY, at, [c] + [None] * (n - 1))
        if not ok[j] or FALLBACK_KEY in info:
            _put(info, FALLBACK_KEY, at, [not ok[j]] * n, pad=False)


def _put(info: dict, key: str, at: int, values: list, pad=None) -> None:
    """Write per-token entries starting at output index `at`, padding any gap before it."""
    entries = info.setdefault(key, [])
    del entries[at:]
    entries.extend([pad] * (at - len(entries)))
    entries.extend(values)


def attach(logits_output, outputs: List[LenVMDeviceOutput], next_token_ids) -> None:
    """Hand this step's outputs to SGLang's auxiliary-output path (after sampling)."""
    from sglang.srt.managers.auxiliary_output import append_auxiliary_output

    for out in outputs:
        logits_output.auxiliary_device_output = append_auxiliary_output(
            logits_output.auxiliary_device_output, out.with_chosen(next_token_ids))
