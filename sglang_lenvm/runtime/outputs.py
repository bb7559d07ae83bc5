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
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch

from sglang_lenvm.returns import remaining_from_p

VALUES_KEY = "lenvm_p"
PREDICTED_KEY = "lenvm_predicted_length"
FALLBACK_KEY = "lenvm_fallback"
REQUEST_LEVEL_KEYS = frozenset({PREDICTED_KEY})


@dataclasses.dataclass(frozen=True)
class LenVMDeviceOutput:
    batch_rows: List[int]  # batch row of each entry below
    want_values: List[bool]
    p_state: torch.Tensor  # [n] value of the state before this step's token
    ok: torch.Tensor  # [n] bool, False where the row fell back to unguided sampling
    gamma: float

    def copy_to_host(self, copy_tensor) -> "LenVMHostOutput":
        return LenVMHostOutput(self.batch_rows, self.want_values, copy_tensor(self.p_state),
                               copy_tensor(self.ok), self.gamma)


@dataclasses.dataclass(frozen=True)
class LenVMHostOutput:
    batch_rows: List[int]
    want_values: List[bool]
    p_state: torch.Tensor
    ok: torch.Tensor
    gamma: float

    def consume(self, batch, commits) -> None:
        p_state = self.p_state.tolist()
        ok = self.ok.tolist()
        for j, i in enumerate(self.batch_rows):
            commit = commits[i]
            if commit is None:  # a prefill chunk that samples nothing, or a finished request
                continue
            req = batch.reqs[i]
            info = req.customized_info
            if info is None:
                info = req.customized_info = {}
            n = len(commit.token_ids)
            if PREDICTED_KEY not in info and commit.output_index == 0:
                info[PREDICTED_KEY] = [remaining_from_p(p_state[j], self.gamma)]
            if self.want_values[j]:
                info.setdefault(VALUES_KEY, []).extend([p_state[j]] + [None] * (n - 1))
            if not ok[j] or FALLBACK_KEY in info:
                pad = len(info.get(FALLBACK_KEY, ()))
                info.setdefault(FALLBACK_KEY, []).extend(
                    [False] * (commit.output_index - pad) + [not ok[j]] * n)
