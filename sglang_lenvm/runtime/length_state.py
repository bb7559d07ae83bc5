"""Per-request length settings as batched tensors, living on SGLang's `SamplingBatchInfo`.

Like SGLang's penaltylib, the state has a lifecycle tied to the batch: built once when a batch
is formed (`build`), indexed when finished requests leave (`filter`), concatenated when a
prefill batch joins the running batch (`merge`). Every step then reads whole tensors: no Python
loop over requests. The tokens generated so far are not stored: they are derived on the device
each step as `seq_len - prompt_len` (overlap scheduling makes CPU-side counts lag by a token).

Each field says how it follows the rows (`_ROW`): host lists and CPU tensors are indexed on the
host, device tensors on the device; filter, merge and rows loop over the fields by that tag.
Updates are functional (filter/merge return new objects) because SGLang hands the forward a
shallow copy of the sampling info while the scheduler goes on filtering its own. The one
exception is quarantine (faults.py), which switches a row off in the shared host lists at once
(and on the request, which every later build/filter/merge reads).

Every phase is isolated (faults.isolated): a row whose build fails is quarantined and the
state is rebuilt from the requests, which hold everything the state is made of.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from sglang_lenvm.runtime import faults, repeat_guard
from sglang_lenvm.runtime.attached import fault_of, params_of
from sglang_lenvm.schema import MODE_NONE, NEVER, equal_stop_length

HOST, DEVICE, CPU = "host", "device", "cpu"  # how a field follows the rows


def _row(kind: str, **kw):
    return dataclasses.field(metadata={"row": kind}, **kw)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Server settings the state is built with."""

    device: object
    default_top_k: int
    max_top_k: int
    equal_max_overshoot: float = math.inf


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
    return sorted(i for i in ids if i is not None and i >= 0)


def _final_chunk(req) -> bool:
    """Whether the request's coming extend is its last prefill chunk (it samples a token)."""
    fill = getattr(req, "full_untruncated_fill_ids", None)
    end = getattr(req, "extend_end", None)
    return fill is None or end is None or end >= len(fill)


@dataclasses.dataclass(frozen=True)
class LengthState:
    settings: Settings = _row("none")
    num_candidates: int = _row("none")  # largest candidate count of a steering row (0: none)
    # --- host side, one entry per row ---
    reqs: List = _row(HOST)  # the Req, None for rows that never used the LenVM
    active: List[bool] = _row(HOST)  # row uses the LenVM (steers, or only reports values)
    steer: List[bool] = _row(HOST)  # row's sampling is changed by the LenVM
    want_values: List[bool] = _row(HOST)
    modes: List[int] = _row(HOST)  # MODE_* per row, on the host: decides which steps run
    top_ks: List[int] = _row(HOST)  # `top_k` on the host: sizes each row's star tree
    final_chunk: List[bool] = _row(HOST)  # the batch's extend is the row's last prefill chunk
    # --- device side, one row per request ---
    mode: torch.Tensor = _row(DEVICE)  # int64 MODE_*
    target: torch.Tensor = _row(DEVICE)  # int64, 0 where unset
    beta: torch.Tensor = _row(DEVICE)  # float32
    prompt_len: torch.Tensor = _row(DEVICE)  # int64
    top_k: torch.Tensor = _row(DEVICE)  # int64 candidates for this row (0 for non-steering rows)
    greedy: torch.Tensor = _row(DEVICE)  # bool
    stop_ids: torch.Tensor = _row(DEVICE)  # int64 [bs, S], -1 padded
    # equal rows: the sequence length (prompt + output so far) from which the row's stop token
    # is a candidate at every step (see equal_stop_length); NEVER for other rows. On the
    # device for the step, and a CPU copy so that steps with no row near it skip the extra slot.
    equal_stop_seq_len: torch.Tensor = _row(DEVICE)  # int64
    equal_stop_seq_len_cpu: torch.Tensor = _row(CPU)  # int64, on the CPU
    # The last repeat_guard.WINDOW output tokens (a ring buffer, -1 empty) for the repetition
    # guard; written in place by each decode step (repeat_guard.record).
    recent: torch.Tensor = _row(DEVICE)  # int64 [bs, WINDOW]
    steer_flag: torch.Tensor = _row(DEVICE)  # bool: `steer` on the device (quarantined rows
    # keep True here, but are never among the rows a step scores)
    # Device index tensors of row lists, made once per state (a state lives as long as its
    # batch's composition): a step indexes with them without a host-to-device copy.
    _index_memo: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                          compare=False, metadata={"row": "none"})

    @property
    def any_active(self) -> bool:
        return any(self.active)

    @property
    def any_steer(self) -> bool:
        return self.num_candidates > 0 and any(self.steer)

    def __len__(self) -> int:
        return len(self.active)

    def rids(self, rows: Optional[Sequence[int]] = None) -> List[Optional[str]]:
        rows = range(len(self)) if rows is None else rows
        return [getattr(self.reqs[i], "rid", None) for i in rows]

    def device_index(self, rows: Sequence[int]) -> torch.Tensor:
        """`rows` as an int64 tensor on the device: built on first use, then reused."""
        key = tuple(rows)
        return self.memo(key, lambda: self.memo_tensor(key))

    def memo(self, key, build: Callable[[], object]):
        """`build()`, made once per state and `key` (a state lives as long as its batch's
        composition: what depends only on that is not rebuilt every step)."""
        if key not in self._index_memo:
            if len(self._index_memo) >= 16:  # per-row fallbacks could otherwise pile up
                self._index_memo.clear()
            self._index_memo[key] = build()
        return self._index_memo[key]

    def memo_tensor(self, values: Sequence[int]) -> torch.Tensor:
        """An int64 device tensor for `memo` (the one host-to-device copy it stands for)."""
        return torch.tensor(list(values), dtype=torch.int64).to(self.settings.device,
                                                                 non_blocking=True)

    def deactivate(self, i: int) -> None:
        """Switch row i off in place (after quarantine); seen by every holder of this state."""
        self.active[i] = self.steer[i] = self.want_values[i] = False

    # ---- build ----

    @classmethod
    def build(cls, reqs, settings: Settings) -> Optional["LengthState"]:
        """One row per request; None when no request in the batch uses the LenVM."""
        reqs = list(reqs)
        if not any(_wants_lenvm(r) for r in reqs):
            return None
        return faults.fallback(
            "build",
            lambda: cls._from_rows([_row_values(r, settings, "build") if _wants_lenvm(r)
                                    else _idle_row(r) for r in reqs], settings),
            lambda: cls.rebuild(reqs, settings))

    @classmethod
    def rebuild(cls, reqs, settings: Settings, phase: str = "build") -> Optional["LengthState"]:
        """Row by row from the requests (the fallback of every phase); failing rows quarantined."""
        rows = []
        for r in reqs:
            values = None
            if _wants_lenvm(r):
                try:
                    values = _row_values(r, settings, phase)
                except Exception as error:  # noqa: BLE001
                    faults.quarantine(r, phase, error)
            rows.append(values or _idle_row(r))
        if not any(r.active for r in rows):
            return None
        return cls._from_rows(rows, settings)

    @classmethod
    def _from_rows(cls, rows: List["_Row"], settings: Settings) -> "LengthState":
        width = max(1, max(len(r.stop_ids) for r in rows))
        stop = torch.full((len(rows), width), -1, dtype=torch.int64)
        for i, r in enumerate(rows):
            stop[i, : len(r.stop_ids)] = torch.tensor(r.stop_ids, dtype=torch.int64)
        stop_seq = torch.tensor([r.equal_stop_seq_len for r in rows], dtype=torch.int64)

        def dev(values, dtype):
            return torch.tensor(values, dtype=dtype).to(settings.device, non_blocking=True)

        def col(name):
            return [getattr(r, name) for r in rows]

        return cls(
            settings=settings,
            num_candidates=max(col("top_k")),
            reqs=col("req"), active=col("active"), steer=col("steer"),
            want_values=col("want_values"), modes=col("mode"), top_ks=col("top_k"),
            final_chunk=col("final_chunk"),
            mode=dev(col("mode"), torch.int64),
            target=dev(col("target"), torch.int64),
            beta=dev(col("beta"), torch.float32),
            prompt_len=dev(col("prompt_len"), torch.int64),
            top_k=dev(col("top_k"), torch.int64),
            greedy=dev(col("greedy"), torch.bool),
            stop_ids=stop.to(settings.device, non_blocking=True),
            equal_stop_seq_len=stop_seq.to(settings.device, non_blocking=True),
            equal_stop_seq_len_cpu=stop_seq,
            steer_flag=dev(col("steer"), torch.bool),
            recent=dev(col("history"), torch.int64),
        )

    @classmethod
    def empty(cls, n: int, settings: Settings) -> "LengthState":
        return cls._from_rows([_idle_row(None)] * n, settings)

    # ---- lifecycle ----

    def filter(self, keep: List[int], keep_device: torch.Tensor) -> Optional["LengthState"]:
        reqs = [self.reqs[i] for i in keep]
        if not any(self.active[i] for i in keep):
            return None

        def batched():
            faults.inject("filter", [r.rid for r in reqs if _wants_lenvm(r)])
            return self._index(keep, keep_device)

        state = faults.fallback("filter", batched,
                                lambda: LengthState.rebuild(reqs, self.settings, "filter"))
        return state._refreshed() if state is not None else None

    def merge(self, other: "LengthState") -> Optional["LengthState"]:
        reqs = self.reqs + other.reqs

        def batched():
            faults.inject("merge", [r.rid for r in reqs if _wants_lenvm(r)])
            return self._concat(other)

        state = faults.fallback("merge", batched,
                                lambda: LengthState.rebuild(reqs, self.settings, "merge"))
        return state._refreshed() if state is not None else None

    def rows(self, index: torch.Tensor) -> "LengthState":
        """The device tensors of a subset of rows (host lists are not needed there)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[index]
                                            for f in _fields(DEVICE)})

    def _index(self, keep: List[int], keep_device: torch.Tensor) -> "LengthState":
        new = {f.name: [getattr(self, f.name)[i] for i in keep] for f in _fields(HOST)}
        new.update({f.name: getattr(self, f.name)[keep_device] for f in _fields(DEVICE)})
        new.update({f.name: getattr(self, f.name)[keep] for f in _fields(CPU)})
        # An upper bound is enough on the host.
        return dataclasses.replace(self, **new)

    def _concat(self, other: "LengthState") -> "LengthState":
        width = max(self.stop_ids.shape[1], other.stop_ids.shape[1])

        def cat(name, a, b):
            if name == "stop_ids":  # pad to the wider row
                a, b = (torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)
                        for t in (a, b))
            return torch.cat([a, b])

        new = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in _fields(HOST)}
        new.update({f.name: cat(f.name, getattr(self, f.name), getattr(other, f.name))
                    for f in _fields(DEVICE) + _fields(CPU)})
        return dataclasses.replace(self, num_candidates=max(self.num_candidates,
                                                            other.num_candidates), **new)

    def _refreshed(self) -> Optional["LengthState"]:
        """Rows quarantined since this state was made are off (a copy of the host lists)."""
        off = [i for i, r in enumerate(self.reqs) if r is not None and fault_of(r) is not None]
        state = dataclasses.replace(self, active=list(self.active), steer=list(self.steer),
                                    want_values=list(self.want_values))
        for i in off:
            state.deactivate(i)
        if not state.any_active:
            return None
        if not any(state.steer):
            state = dataclasses.replace(state, num_candidates=0)
        return state


def _fields(kind: str):
    return [f for f in dataclasses.fields(LengthState) if f.metadata["row"] == kind]


def _wants_lenvm(req) -> bool:
    p = params_of(req)
    return p is not None and p.uses_lenvm and fault_of(req) is None


class _Row(NamedTuple):
    """What one request contributes to the state."""

    req: object
    active: bool
    steer: bool
    want_values: bool
    mode: int
    top_k: int
    target: int
    beta: float
    greedy: bool
    stop_ids: List[int]
    final_chunk: bool
    equal_stop_seq_len: int
    prompt_len: int
    history: List[int]  # repeat_guard.history_row of the output so far


_EMPTY_HISTORY = [-1] * repeat_guard.WINDOW


def _idle_row(req) -> _Row:
    prompt = len(req.origin_input_ids) if req is not None else 0
    return _Row(None, False, False, False, MODE_NONE, 0, 0, 0.0, False, [], True, NEVER, prompt,
                _EMPTY_HISTORY)


def _row_values(req, settings: Settings, phase: str) -> _Row:
    faults.inject(phase, [req.rid])
    p = params_of(req)
    k = 0
    if p.steers:
        k = min(p.top_k if p.top_k is not None else settings.default_top_k, settings.max_top_k)
    prompt = len(req.origin_input_ids)
    stop_seq = NEVER
    if p.mode == "equal":
        # The token that makes the output `limit` long is generated at sequence length
        # prompt + limit - 1 (seq_len counts the step's input token, not its output).
        limit = equal_stop_length(p.target, settings.equal_max_overshoot)
        stop_seq = NEVER if limit == NEVER else prompt + limit - 1
    return _Row(req, True, p.steers, p.return_values, p.mode_code, k, p.target or 0, p.beta,
                p.greedy, request_stop_ids(req), _final_chunk(req), stop_seq, prompt,
                _history(req))


def _history(req) -> List[int]:
    """The request's output so far (a state built mid-generation: a retracted request)."""
    out = getattr(req, "output_ids", None)
    return repeat_guard.history_row(out) if out else _EMPTY_HISTORY


def merge_optional(a: Optional[LengthState], a_reqs, b: Optional[LengthState], b_reqs,
                   settings: Settings) -> Optional[LengthState]:
    """Merge two batches' states, either of which may be None (no LenVM row)."""
    if a is None and b is None:
        return None
    a = a or LengthState.empty(len(a_reqs), settings)
    b = b or LengthState.empty(len(b_reqs), settings)
    return a.merge(b)
