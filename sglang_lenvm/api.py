"""Length control in SGLang's HTTP API: request fields, validation, extra endpoints.

Request fields (top level on /v1/chat/completions and /v1/completions, where the OpenAI SDK's
`extra_body` puts them; top level or inside `sampling_params` on /generate):
  length_target          int >= 1, the output length in tokens (EOS included)
  length_mode            "equal" | "at_most" | "at_least" (default "equal" with a target)
  beta                   finite float: tilt p'(x) ~ p(x) exp(beta * LenVM(x)); < 0 is shorter
  return_length_values   bool: return the LenVM value trace
SGLang's request models silently drop unknown fields, so an ASGI middleware reads ours from
the raw JSON, validates them (HTTP 400 naming the field), and moves them into
`custom_params["__lenvm"]`, which travels with the request to the scheduler. LenVM requests
also get their own radix-cache namespace (`extra_key`): their cached prefixes always have LenVM
KV beside them, while other traffic never pays for the mirror.

Extra endpoints: POST /v1/length/predict, GET /lenvm/stats.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from sglang_lenvm.config import LenVMConfig
from sglang_lenvm.runtime.length_state import MODES, PARAMS_KEY

FIELDS = ("length_target", "length_mode", "beta", "return_length_values")
EXTRA_KEY = "lenvm"
MAX_ABS_BETA = 1e4
GENERATE_DEFAULT_MAX_NEW_TOKENS = 128  # SamplingParams.max_new_tokens default in SGLang
GUIDED_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")

_config: Optional[LenVMConfig] = None


class RequestError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_length_params(fields: dict, sampling: dict, *, max_top_k: int,
                        context_len: Optional[int],
                        max_tokens_field: str = "max_tokens") -> Optional[dict]:
    """Validate our fields; returns the private params dict, or None if the LenVM is not used.

    `sampling` holds the request's own sampling fields (max_tokens/max_new_tokens, top_k,
    temperature, n, ...) for the cross-field checks.
    """
    target = fields.get("length_target")
    mode = fields.get("length_mode")
    beta = fields.get("beta", 0.0)
    values = fields.get("return_length_values", False)

    if target is not None:
        if not _is_int(target):
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
    if not _is_number(beta) or not math.isfinite(beta):
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
        if not _is_int(top_k) or top_k < 1:
            raise RequestError("top_k must be a positive integer or -1", "top_k")
        if mode is not None or beta != 0:
            if top_k > max_top_k:
                raise RequestError(f"guided decoding scores at most {max_top_k} candidates per "
                                   f"step; top_k={top_k} is larger", "top_k")
    else:
        top_k = None
    max_tokens = sampling.get("max_tokens")
    if mode in ("equal", "at_least") and _is_int(max_tokens) and max_tokens < target:
        raise RequestError(f"{max_tokens_field} ({max_tokens}) is below length_target ({target}): "
                           f"length_mode={mode!r} could not reach it", max_tokens_field)
    temperature = sampling.get("temperature")
    greedy = _is_number(temperature) and 0 <= temperature < 1e-6
    return {"target": target, "mode": mode, "beta": float(beta), "return_values": values,
            "top_k": top_k, "greedy": greedy}


def rewrite_body(path: str, body: dict, *, lenvm_loaded: bool, max_top_k: int,
                 context_len: Optional[int]) -> dict:
    """Move our fields into custom_params (raising RequestError on bad values)."""
    if path == "/generate":
        sp = body.get("sampling_params")
        if isinstance(sp, list):  # a batch: one sampling_params per prompt
            guided = [_rewrite_one(body, item, "max_new_tokens", lenvm_loaded, max_top_k,
                                   context_len, shared_fields=True) if isinstance(item, dict)
                      else False for item in sp]
            for f in FIELDS:
                body.pop(f, None)
            if any(guided):
                keys = body.get("extra_key")
                keys = keys if isinstance(keys, list) else [keys] * len(sp)
                body["extra_key"] = [_namespace(k) if g else k for k, g in zip(keys, guided)]
            return body
        if sp is None:
            sp = body["sampling_params"] = {}
        if not isinstance(sp, dict):
            return body
        if _rewrite_one(body, sp, "max_new_tokens", lenvm_loaded, max_top_k, context_len):
            body["extra_key"] = _namespace(body.get("extra_key"))
        return body
    if _rewrite_one(body, body, "max_tokens", lenvm_loaded, max_top_k, context_len):
        key = body.get("extra_key")
        body["extra_key"] = [_namespace(k) for k in key] if isinstance(key, list) else _namespace(key)
    return body


def _namespace(key):
    """The radix-cache namespace of LenVM requests (keeping the caller's own extra_key)."""
    return f"{EXTRA_KEY}|{key}" if key else EXTRA_KEY


def _rewrite_one(body: dict, sp: dict, max_key: str, lenvm_loaded: bool, max_top_k: int,
                 context_len, shared_fields: bool = False) -> bool:
    """Validate one request's fields and move them into its sampling params; True if guided."""
    cp = sp.get("custom_params")
    if isinstance(cp, dict) and PARAMS_KEY in cp:
        raise RequestError(f"custom_params.{PARAMS_KEY} is reserved", "custom_params")
    fields = {}
    for f in FIELDS:
        in_body = f in body
        in_sp = sp is not body and f in sp
        if in_body and in_sp:
            raise RequestError(f"{f} given both at top level and in sampling_params", f)
        if in_body:
            fields[f] = body[f] if shared_fields else body.pop(f)
        elif in_sp:
            fields[f] = sp.pop(f)
    if not fields:
        return False
    max_tokens = sp.get(max_key, sp.get("max_completion_tokens"))
    if max_key == "max_new_tokens" and max_key not in sp:
        max_tokens = GENERATE_DEFAULT_MAX_NEW_TOKENS  # what SGLang's /generate applies
    sampling = {
        "max_tokens": max_tokens,
        "top_k": sp.get("top_k"),
        "temperature": sp.get("temperature"),
    }
    params = parse_length_params(fields, sampling, max_top_k=max_top_k, context_len=context_len,
                                 max_tokens_field=max_key)
    if params is None:
        return False
    if not lenvm_loaded:
        name = next(f for f in FIELDS if fields.get(f) not in (None, False, 0, 0.0))
        raise RequestError(f"{name} needs a LenVM, and this server was started without one "
                           f"(--lenvm-path)", name)
    if body.get("custom_logit_processor") or sp.get("custom_logit_processor"):
        raise RequestError("custom_logit_processor cannot be combined with length guidance",
                           "custom_logit_processor")
    if params["mode"] == "at_most":
        cap = sampling["max_tokens"]
        sp[max_key] = params["target"] if not _is_int(cap) else min(cap, params["target"])
    cp = dict(cp) if isinstance(cp, dict) else {}
    cp[PARAMS_KEY] = params
    sp["custom_params"] = cp
    return True


class LengthFieldsMiddleware:
    """Pure ASGI middleware: rewrite JSON bodies of the generation endpoints."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                scope.get("path") not in GUIDED_PATHS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else None
            is_json = True
        except ValueError:
            body, is_json = None, False  # not JSON at all: SGLang answers it (400)
        if raw and is_json and not isinstance(body, dict):
            return await _send_error(send, "request body must be a JSON object", "body")
        if isinstance(body, dict):
            try:
                body = rewrite_body(scope["path"], body, lenvm_loaded=_config is not None,
                                    max_top_k=_config.max_top_k if _config else 64,
                                    context_len=_context_len())
            except RequestError as e:
                return await _send_error(send, str(e), e.param)
            raw = json.dumps(body).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        scope = dict(scope, headers=headers)
        await self.app(scope, _replay([{"type": "http.request", "body": raw,
                                        "more_body": False}], receive), send)


def _replay(messages, then=None):
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


async def _send_error(send, message: str, param: str) -> None:
    payload = json.dumps({"object": "error", "message": message, "type": "BadRequestError",
                          "param": param, "code": 400}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _tokenizer_manager():
    from sglang.srt.entrypoints import http_server

    state = http_server._global_state
    return state.tokenizer_manager if state is not None else None


def _context_len() -> Optional[int]:
    tm = _tokenizer_manager()
    mc = getattr(tm, "model_config", None)
    return getattr(mc, "context_len", None)


def install(config: Optional[LenVMConfig]) -> None:
    """Wire the middleware, the response hooks and our endpoints into SGLang's HTTP app."""
    global _config
    _config = config
    from sglang.srt.entrypoints.http_server import app

    app.add_middleware(LengthFieldsMiddleware)
    from sglang_lenvm import endpoints, responses

    responses.install()
    endpoints.install(app, config)
