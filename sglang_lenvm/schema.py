"""The length-control request schema: public fields, the private wire form, and validation.

One request travels in two forms:
- public fields, as clients send them (top level on the OpenAI routes, top level or inside
  `sampling_params` on /generate, in `sampling_params` of the Engine API):
    length_target, length_mode, beta, return_length_values;
- the private wire form, `custom_params["__lenvm"]`: a JSON dict with the validated request,
  written only by our front door (the HTTP middleware or the Engine hook) and parsed again by
  the scheduler. Clients may not send it (HTTP 400 naming it on every route).

`parse_public` validates public fields (RequestError names the field), `LengthParams.from_wire`
validates the wire form (RequestError names `custom_params.__lenvm.<key>`); both produce the
same frozen `LengthParams`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

FIELDS = ("length_target", "length_mode", "beta", "return_length_values")
PARAMS_KEY = "__lenvm"  # the private entry in SamplingParams.custom_params
WIRE_NAME = f"custom_params.{PARAMS_KEY}"
# Radix-cache namespace (extra_key) of LenVM requests: their cached prefixes always have LenVM
# KV beside them. Only the scheduler grants it, to requests it admitted as LenVM requests.
NAMESPACE = "lenvm"

MODE_NONE, MODE_EQUAL, MODE_AT_MOST, MODE_AT_LEAST = 0, 1, 2, 3
MODES = {"equal": MODE_EQUAL, "at_most": MODE_AT_MOST, "at_least": MODE_AT_LEAST}
MAX_ABS_BETA = 1e4
NEVER = 1 << 62  # a sequence length no request reaches


class RequestError(ValueError):
    """A request the server refuses; `param` names the offending field (HTTP 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def equal_stop_length(target: int, max_overshoot: float) -> int:
    """Output length (stop token included) by which an `equal` output ends at the latest."""
    if not math.isfinite(max_overshoot):
        return NEVER
    # round() first: (1 + 0.1) * 10 is 11.000000000000002 in floating point.
    return max(target, math.ceil(round((1.0 + max_overshoot) * target, 9)))


@dataclasses.dataclass(frozen=True)
class LengthParams:
    """One validated request."""

    target: Optional[int] = None
    mode: Optional[str] = None
    beta: float = 0.0
    return_values: bool = False
    top_k: Optional[int] = None  # the request's own top_k, if it set one
    greedy: bool = False  # temperature 0 at the API (SGLang turns it into top_k=1)
    # The request set no output limit of its own, so the target sets one (see parse_public),
    # applied by the scheduler: max_new_tokens = budget, or no limit but the context when
    # budget_open. None and False: the request's own max_new_tokens stands.
    budget: Optional[int] = None
    budget_open: bool = False

    @property
    def steers(self) -> bool:
        return self.mode is not None or self.beta != 0.0

    @property
    def uses_lenvm(self) -> bool:
        return self.steers or self.return_values

    @property
    def mode_code(self) -> int:
        return MODES.get(self.mode, MODE_NONE)

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, raw: Any, *, max_top_k: int,
                  context_len: Optional[int] = None) -> "LengthParams":
        """Validate the private form strictly (it may come from anywhere inside the server)."""
        def bad(key, why):
            return RequestError(f"{WIRE_NAME}.{key} {why}" if key else f"{WIRE_NAME} {why}",
                                f"{WIRE_NAME}.{key}" if key else WIRE_NAME)

        if not isinstance(raw, Mapping):
            raise bad(None, "must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise bad(unknown[0], "is not a known key")
        target, mode = raw.get("target"), raw.get("mode")
        if target is not None and (not is_int(target) or target < 1 or
                                   (context_len is not None and target > context_len)):
            raise bad("target", f"must be an integer in [1, {context_len or 'context'}]")
        if mode is not None and (not isinstance(mode, str) or mode not in MODES):
            raise bad("mode", f"must be one of {sorted(MODES)}")
        if (mode is None) != (target is None):
            raise bad("mode", "and target go together")
        beta = raw.get("beta", 0.0)
        if not is_number(beta) or not math.isfinite(beta) or abs(beta) > MAX_ABS_BETA:
            raise bad("beta", f"must be a finite number within +-{MAX_ABS_BETA:g}")
        if mode == "equal" and beta != 0:
            raise bad("beta", "cannot be combined with mode equal")
        for key in ("return_values", "greedy", "budget_open"):
            if not isinstance(raw.get(key, False), bool):
                raise bad(key, "must be a boolean")
        top_k = raw.get("top_k")
        if top_k is not None and (not is_int(top_k) or not 1 <= top_k):
            raise bad("top_k", "must be a positive integer")
        if top_k is not None and (mode is not None or beta != 0) and top_k > max_top_k:
            raise bad("top_k", f"must be at most {max_top_k} with guidance")
        budget = raw.get("budget")
        if budget is not None and (not is_int(budget) or budget < 1):
            raise bad("budget", "must be a positive integer")
        if budget is not None and raw.get("budget_open", False):
            raise bad("budget_open", "excludes budget")
        return cls(target=target, mode=mode, beta=float(beta),
                   return_values=raw.get("return_values", False), top_k=top_k,
                   greedy=raw.get("greedy", False), budget=budget,
                   budget_open=raw.get("budget_open", False))


def parse_public(fields: Mapping, sampling: Mapping, *, max_top_k: int,
                 context_len: Optional[int], max_field: str = "max_tokens",
                 equal_max_overshoot: float = math.inf) -> Optional[LengthParams]:
    """Validate a request's public fields; None when the request does not use the LenVM.

    `sampling` holds the request's own sampling fields for the cross-field checks:
    `max_tokens` (None when the request set no limit; its name for messages is `max_field`),
    `top_k`, `temperature`.

    The output budget: a request's own limit is kept (`capped_limit` caps it at the target for
    at_most; equal and at_least refuse one below the target). Without one, the target sets it
    (`budget`, applied by the scheduler): at_most -> T, equal -> ceil((1 + F) * T) with F the
    overshoot limit (no limit but the context when F is inf), at_least -> no limit but the
    context. Requests that only tilt (beta) or only read values keep the route's own default.
    """
    target = fields.get("length_target")
    mode = fields.get("length_mode")
    beta = fields.get("beta", 0.0)
    values = fields.get("return_length_values", False)

    if target is not None:
        if not is_int(target):
            raise RequestError("length_target must be an integer number of tokens", "length_target")
        if target < 1:
            raise RequestError(f"length_target must be >= 1, got {target}", "length_target")
        if context_len is not None and target > context_len:
            raise RequestError(f"length_target {target} exceeds the model's context length "
                               f"{context_len}", "length_target")
    if mode is not None:
        if not isinstance(mode, str) or mode not in MODES:
            raise RequestError(f"length_mode must be one of {sorted(MODES)}, got {mode!r}",
                               "length_mode")
        if target is None:
            raise RequestError(f"length_mode={mode!r} needs a length_target", "length_mode")
    elif target is not None:
        mode = "equal"
    if beta is None:
        beta = 0.0
    if not is_number(beta) or not math.isfinite(beta):
        raise RequestError(f"beta must be a finite number, got {beta!r}", "beta")
    if abs(beta) > MAX_ABS_BETA:
        raise RequestError(f"beta must be within +-{MAX_ABS_BETA:g}, got {beta}", "beta")
    if mode == "equal" and beta != 0:
        raise RequestError("beta cannot be combined with length_mode='equal' (equal picks one "
                           "token deterministically); use at_most/at_least or no mode", "beta")
    if values is None:
        values = False
    if not isinstance(values, bool):
        raise RequestError("return_length_values must be a boolean", "return_length_values")
    if mode is None and beta == 0 and not values:
        return None

    top_k = sampling.get("top_k")
    if top_k is not None and top_k != -1:
        if not is_int(top_k) or top_k < 1:
            raise RequestError("top_k must be a positive integer or -1", "top_k")
        if (mode is not None or beta != 0) and top_k > max_top_k:
            raise RequestError(f"guided decoding scores at most {max_top_k} candidates per "
                               f"step; top_k={top_k} is larger", "top_k")
    else:
        top_k = None
    temperature = sampling.get("temperature")
    greedy = is_number(temperature) and 0 <= temperature < 1e-6

    limit = sampling.get("max_tokens")
    budget, budget_open = None, False
    if limit is None:  # the target sets the budget (the scheduler applies it)
        if mode == "at_most":
            budget = target
        elif mode == "equal":
            stop = equal_stop_length(target, equal_max_overshoot)
            budget, budget_open = (None, True) if stop == NEVER else (stop, False)
        elif mode == "at_least":
            budget_open = True
    elif is_int(limit) and mode in ("equal", "at_least") and limit < target:
        raise RequestError(f"{max_field} ({limit}) is below length_target ({target}): "
                           f"length_mode={mode!r} could not reach it", max_field)
    return LengthParams(target, mode, float(beta), values, top_k, greedy, budget, budget_open)


def capped_limit(params: Optional[LengthParams], limit):
    """The request's own output limit, capped at the target for at_most."""
    if params is not None and params.mode == "at_most" and is_int(limit) and limit > params.target:
        return params.target
    return limit


def namespace(extra_key: Optional[str]) -> str:
    """The radix-cache namespace of a LenVM request (keeping the caller's own extra_key)."""
    return f"{NAMESPACE}|{extra_key}" if extra_key else NAMESPACE


def outside_namespace(extra_key: Optional[str]) -> Optional[str]:
    """A non-LenVM request's extra_key, moved out of our namespace if it claimed it.

    A request whose KV is not mirrored must never land in the LenVM namespace, or later LenVM
    requests sharing its prefix would read LenVM KV that was never written.
    """
    if isinstance(extra_key, str) and extra_key.startswith(NAMESPACE):
        return "user:" + extra_key
    return extra_key
