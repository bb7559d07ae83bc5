"""Per-request length settings as batched tensors, living on SGLang's `SamplingBatchInfo`.

Like SGLang's penaltylib, the state has a lifecycle tied to the batch: built once when a batch
is formed (`build`), indexed when finished requests leave (`filter`), concatenated when a
prefill batch joins the running batch (`merge`). Every step then reads whole tensors: no Python
loop over requests. The tokens generated so far are not stored: they are derived on the device
each step as `seq_len - prompt_len` (overlap scheduling makes CPU-side counts lag by a token).

Updates are functional (filter/merge return new objects) because SGLang hands the forward a
shallow copy of the sampling info while the scheduler goes on filtering its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch

PARAMS_KEY = "__lenvm"  # our private entry in SamplingParams.custom_params, set by api.py

MODE_NONE, MODE_EQUAL, MODE_AT_MOST, MODE_AT_LEAST = 0, 1, 2, 3
MODES = {"equal": MODE_EQUAL, "at_most": MODE_AT_MOST, "at_least": MODE_AT_LEAST}
NEVER = 1 << 62  # a sequence length no request reaches


def equal_stop_length(target: int, max_overshoot: float) -> int:
    """Output length (stop token included) by which an `equal` output ends at the latest."""
    if not math.isfinite(max_overshoot):
        return NEVER
    # round() first: (1 + 0.1) * 10 is 11.000000000000002 in floating point.
    return max(target, math.ceil(round((1.0 + max_overshoot) * target, 9)))


@dataclasses.dataclass(frozen=True)
class RequestLengthParams:
    """What one request asked for (validated by the API layer)."""

    target: Optional[int] = None
    mode: Optional[str] = None
    beta: float = 0.0
    return_values: bool = False
    top_k: Optional[int] = None  # the request's own top_k, if it set one
    greedy: bool = False  # temperature 0 at the API (SGLang turns it into top_k=1)

    @property
    def steers(self) -> bool:
        return self.mode is not None or self.beta != 0.0

    @property
    def uses_lenvm(self) -> bool:
        return self.steers or self.return_values

    @classmethod
    def from_req(cls, req) -> Optional["RequestLengthParams"]:
        cp = req.sampling_params.custom_params
        raw = cp.get(PARAMS_KEY) if isinstance(cp, dict) else None
        if not raw:
            return None
        params = cls(**raw)
        return params if params.uses_lenvm else None


def request_stop_ids(req) -> List[int]:
    """Token ids that end this request (their LenVM value is 0 by definition)."""
    if req.sampling_params.ignore_eos:
        return []
    ids = set(req.sampling_params.stop_token_ids or ())
    ids |= set(req.eos_token_ids or ())
    tok = getattr(req, "tokenizer", None)
    if tok is not None:
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        ids |= set(getattr(tok, "additional_stop_token_ids", None) or ())
    return sorted(ids)


@dataclasses.dataclass(frozen=True)
class LengthState:
    # --- host side (cheap gating, no device sync) ---
    active: List[bool]  # row uses the LenVM at all (steers, or only reports values)
    steer: List[bool]  # row's sampling is changed by the LenVM
    want_values: List[bool]
    modes: List[int]  # MODE_* per row, on the host too: decides which steps run at all
    num_candidates: int  # largest candidate count among steering rows (0: none steer)
    # --- device side, one row per request ---
    mode: torch.Tensor  # int64 MODE_*
    target: torch.Tensor  # int64, 0 where unset
    beta: torch.Tensor  # float32
    prompt_len: torch.Tensor  # int64
    top_k: torch.Tensor  # int64 candidates for this row (0 for non-steering rows)
    greedy: torch.Tensor  # bool
    stop_ids: torch.Tensor  # int64 [bs, S], -1 padded
    # equal rows: the sequence length (prompt + output so far) from which the row's stop token
    # is a candidate at every step (see equal_stop_length); NEVER for other rows. On the
    # device for the step, and a CPU copy so that steps with no row near it skip the extra slot.
    equal_stop_seq_len: torch.Tensor  # int64
    equal_stop_seq_len_cpu: torch.Tensor  # int64, on the CPU

    @property
    def any_active(self) -> bool:
        return any(self.active)

    @property
    def any_steer(self) -> bool:
        return self.num_candidates > 0

    def __len__(self) -> int:
        return len(self.active)

    @classmethod
    def build(cls, reqs, device, default_top_k: int, max_top_k: int,
              equal_max_overshoot: float = math.inf) -> Optional["LengthState"]:
        """One row per request; None when no request in the batch uses the LenVM."""
        params = [RequestLengthParams.from_req(r) for r in reqs]
        if not any(p is not None for p in params):
            return None
        rows = []
        for req, p in zip(reqs, params):
            p = p or RequestLengthParams()
            k = 0
            if p.steers:
                k = min(p.top_k if p.top_k is not None else default_top_k, max_top_k)
            rows.append((p, k, len(req.origin_input_ids), request_stop_ids(req) if p.uses_lenvm else []))
        width = max(1, max(len(r[3]) for r in rows))
        stop = torch.full((len(rows), width), -1, dtype=torch.int64)
        for i, r in enumerate(rows):
            stop[i, : len(r[3])] = torch.tensor(r[3], dtype=torch.int64)

        def dev(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        def stop_seq_len(p, prompt_len):
            # The token that makes the output `limit` long is generated at sequence length
            # prompt + limit - 1 (seq_len counts the step's input token, not its output).
            limit = equal_stop_length(p.target, equal_max_overshoot) if p.mode == "equal" else NEVER
            return NEVER if limit == NEVER else prompt_len + limit - 1

        stop_seq = torch.tensor([stop_seq_len(p, n) for p, _, n, _ in rows], dtype=torch.int64)

        return cls(
            active=[p.uses_lenvm for p, *_ in rows],
            steer=[p.steers for p, *_ in rows],
            want_values=[p.return_values for p, *_ in rows],
            modes=[MODES.get(p.mode, MODE_NONE) for p, *_ in rows],
            num_candidates=max(k for _, k, *_ in rows),
            mode=dev([MODES.get(p.mode, MODE_NONE) for p, *_ in rows], torch.int64),
            target=dev([p.target or 0 for p, *_ in rows], torch.int64),
            beta=dev([p.beta for p, *_ in rows], torch.float32),
            prompt_len=dev([r[2] for r in rows], torch.int64),
            top_k=dev([r[1] for r in rows], torch.int64),
            greedy=dev([p.greedy for p, *_ in rows], torch.bool),
            stop_ids=stop.to(device, non_blocking=True),
            equal_stop_seq_len=stop_seq.to(device, non_blocking=True),
            equal_stop_seq_len_cpu=stop_seq,
        )

    @classmethod
    def empty(cls, n: int, device) -> "LengthState":
        z = torch.zeros(n, dtype=torch.int64, device=device)
        return cls(
            active=[False] * n, steer=[False] * n, want_values=[False] * n,
            modes=[MODE_NONE] * n, num_candidates=0,
            mode=z, target=z, beta=torch.zeros(n, dtype=torch.float32, device=device),
            prompt_len=z, top_k=z, greedy=torch.zeros(n, dtype=torch.bool, device=device),
            stop_ids=torch.full((n, 1), -1, dtype=torch.int64, device=device),
            equal_stop_seq_len=torch.full((n,), NEVER, dtype=torch.int64, device=device),
            equal_stop_seq_len_cpu=torch.full((n,), NEVER, dtype=torch.int64),
        )

    def filter(self, keep: List[int], keep_device: torch.Tensor) -> Optional["LengthState"]:
        active = [self.active[i] for i in keep]
        if not any(active):
            return None
        steer = [self.steer[i] for i in keep]
        top_k = self.top_k[keep_device]
        return dataclasses.replace(
            self,
            active=active,
            steer=steer,
            want_values=[self.want_values[i] for i in keep],
            modes=[self.modes[i] for i in keep],
            # An upper bound is enough on the host; it shrinks to 0 when no row steers.
            num_candidates=self.num_candidates if any(steer) else 0,
            mode=self.mode[keep_device],
            target=self.target[keep_device],
            beta=self.beta[keep_device],
            prompt_len=self.prompt_len[keep_device],
            top_k=top_k,
            greedy=self.greedy[keep_device],
            stop_ids=self.stop_ids[keep_device],
            equal_stop_seq_len=self.equal_stop_seq_len[keep_device],
            equal_stop_seq_len_cpu=self.equal_stop_seq_len_cpu[keep],
        )

    def merge(self, other: "LengthState") -> "LengthState":
        width = max(self.stop_ids.shape[1], other.stop_ids.shape[1])

        def pad(t):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)

        return LengthState(
            active=self.active + other.active,
            steer=self.steer + other.steer,
            want_values=self.want_values + other.want_values,
            modes=self.modes + other.modes,
            num_candidates=max(self.num_candidates, other.num_candidates),
            mode=torch.cat([self.mode, other.mode]),
            target=torch.cat([self.target, other.target]),
            beta=torch.cat([self.beta, other.beta]),
            prompt_len=torch.cat([self.prompt_len, other.prompt_len]),
            top_k=torch.cat([self.top_k, other.top_k]),
            greedy=torch.cat([self.greedy, other.greedy]),
            stop_ids=torch.cat([pad(self.stop_ids), pad(other.stop_ids)]),
            equal_stop_seq_len=torch.cat([self.equal_stop_seq_len, other.equal_stop_seq_len]),
            equal_stop_seq_len_cpu=torch.cat([self.equal_stop_seq_len_cpu,
                                              other.equal_stop_seq_len_cpu]),
        )

    def rows(self, index: torch.Tensor) -> "LengthState":
        """The device tensors of a subset of rows (host lists are not needed there)."""
        return dataclasses.replace(
            self, mode=self.mode[index], target=self.target[index], beta=self.beta[index],
            prompt_len=self.prompt_len[index], top_k=self.top_k[index],
            greedy=self.greedy[index], stop_ids=self.stop_ids[index],
            equal_stop_seq_len=self.equal_stop_seq_len[index],
        )


def merge_optional(a: Optional[LengthState], a_len: int, b: Optional[LengthState], b_len: int,
                   device) -> Optional[LengthState]:
    if a is None and b is None:
        return None
    return (a or LengthState.empty(a_len, device)).merge(b or LengthState.empty(b_len, device))
