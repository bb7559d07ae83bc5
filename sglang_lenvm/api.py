"""The HTTP front door: the length fields on every route SGLang serves.

SGLang's request models silently drop unknown fields, so a pure ASGI middleware reads every
JSON body before SGLang does:
- the private key `custom_params.__lenvm`, anywhere in a body, on any route: HTTP 400 naming
  it (only this front door writes it);
- on the routes that generate with length control, the public fields (`schema.FIELDS`) are
  validated (HTTP 400 naming the field) and moved into the private form:
    POST /v1/chat/completions, /v1/completions, /invocations (SageMaker; chat)  top level
    POST and PUT /generate                      top level or in sampling_params (or a list)
    POST /vertex_generate (AIP_PREDICT_ROUTE)   in parameters, top level or sampling_params
- on every other route (Responses, Anthropic, Ollama, embeddings, ...), a public field gets
  HTTP 400 saying where length control is available, instead of being dropped.
- the same fields may come as a JSON object in the `X-Length-Control` request header (for
  proxies that rebuild bodies from a fixed schema: SGLang's router drops unknown body fields
  on chat and /generate but forwards headers); they are merged into the body's top level
  (Vertex: its `parameters`) and then handled as above. Invalid JSON, a non-object, a key
  that is not a public field, a field also in the body, or the header on a route without
  length control: HTTP 400 naming `X-Length-Control` (or the field).
The Engine API has no HTTP layer: `engine_api.py` does the same for its sampling params.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
from typing import Optional
from urllib.parse import parse_qs

from sglang_lenvm import httputil
from sglang_lenvm.config import DEFAULT_MAX_N, LenVMConfig
from sglang_lenvm.schema import (
    FIELDS,
    PARAMS_KEY,
    WIRE_NAME,
    RequestError,
    capped_limit,
    parse_public,
)

OPENAI_CHAT = ("/v1/chat/completions", "/invocations")
OPENAI_COMPLETION = "/v1/completions"
SUPPORTED = "/v1/chat/completions, /v1/completions, /generate, /invocations and /vertex_generate"
HEADER = "X-Length-Control"

_config: Optional[LenVMConfig] = None
_max_n = DEFAULT_MAX_N
# Set for the whole handling of an HTTP request that passed the middleware: a private key
# seen later in that request (by the Engine-side check in engine_api) was written by us.
passed_front_door: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lenvm_passed_front_door", default=False)


def _vertex_route() -> str:
    return os.environ.get("AIP_PREDICT_ROUTE", "/vertex_generate")


def find_private_key(body) -> Optional[str]:
    """Where a body carries custom_params.__lenvm (at any depth), or None. Iterative: a
    hostile body may nest deeper than Python's recursion limit."""
    stack = [(body, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "custom_params" and isinstance(value, dict) and PARAMS_KEY in value:
                    return f"{path}{key}.{PARAMS_KEY}"
                if isinstance(value, (dict, list)):
                    stack.append((value, f"{path}{key}."))
        elif isinstance(node, list):
            stack.extend((v, f"{path}{i}.") for i, v in enumerate(node)
                         if isinstance(v, (dict, list)))
    return None


def rewrite_sampling(top: dict, sp: dict, *, limit_fields, shared: bool = False,
                     context_len: Optional[int] = None) -> bool:
    """Validate one request's public fields and move them into `sp.custom_params`.

    `top` is where top-level fields live (the body), `sp` the request's sampling fields (the
    body itself on the OpenAI routes). `limit_fields` names the request's output-limit fields
    in `sp`, most authoritative first (a route's default limit does not count: without a limit
    of its own, a guided request's budget comes from its target). Returns True if the request
    uses the LenVM.
    """
    fields = {}
    for f in FIELDS:
        in_top, in_sp = f in top, sp is not top and f in sp
        if in_top and in_sp:
            raise RequestError(f"{f} given both at top level and in sampling_params", f)
        if in_top:
            fields[f] = top[f] if shared else top.pop(f)
        elif in_sp:
            fields[f] = sp.pop(f)
    if not fields:
        return False
    limit_field = next((k for k in limit_fields if sp.get(k) is not None), limit_fields[0])
    limit = sp.get(limit_field)
    params = parse_public(
        fields, {"max_tokens": limit, "top_k": sp.get("top_k"),
                 "temperature": sp.get("temperature")},
        max_top_k=_config.max_top_k if _config else 64,
        context_len=context_len if context_len is not None else httputil.context_len(),
        max_field=limit_field,
        equal_max_overshoot=_config.equal_max_overshoot if _config else float("inf"))
    if params is None:
        return False
    if _config is None:
        name = next(f for f in FIELDS if fields.get(f) not in (None, False, 0, 0.0))
        raise RequestError(f"{name} needs a LenVM, and this server was started without one "
                           f"(--lenvm-path)", name)
    if params.steers and (top.get("custom_logit_processor") or sp.get("custom_logit_processor")):
        raise RequestError("custom_logit_processor cannot be combined with length guidance",
                           "custom_logit_processor")
    for name in ("input_embeds", "image_data", "video_data", "audio_data"):
        if top.get(name) is not None:  # the LenVM reads token ids only
            raise RequestError(f"{name} cannot be combined with length control (the LenVM "
                               f"reads token ids only)", name)
    if params.steers and _is_beam(sp.get("beam_width")):
        raise RequestError("beam search cannot be combined with length guidance", "beam_width")
    for k in limit_fields:  # at_most: no output limit above the target, whichever field
        if k in sp:
            sp[k] = capped_limit(params, sp[k])
    cp = sp.get("custom_params")
    cp = dict(cp) if isinstance(cp, dict) else {}
    cp[PARAMS_KEY] = params.to_wire()
    sp["custom_params"] = cp
    return True


def _is_beam(width) -> bool:
    return isinstance(width, (int, float)) and not isinstance(width, bool) and width > 1


def _rewrite_generate(body: dict) -> bool:
    """/generate (and Vertex's parameters): top-level fields or per-request sampling_params."""
    if not any(f in body for f in FIELDS) and not _has_fields(body.get("sampling_params")):
        return False
    sp = body.get("sampling_params")
    if isinstance(sp, list):  # a batch: one sampling_params per prompt; top-level fields shared
        for item in sp:
            if isinstance(item, dict):
                rewrite_sampling(body, item, limit_fields=("max_new_tokens",), shared=True)
        for f in FIELDS:
            body.pop(f, None)
        return True
    if sp is None:
        sp = body["sampling_params"] = {}
    if isinstance(sp, dict):
        rewrite_sampling(body, sp, limit_fields=("max_new_tokens",))
    return True


def _has_fields(sp) -> bool:
    items = sp if isinstance(sp, list) else [sp]
    return any(isinstance(i, dict) and any(f in i for f in FIELDS) for i in items)


def _length_route(method: str, path: str) -> Optional[str]:
    """Which kind of route serves length control: "openai", "generate", "vertex", or None."""
    if method == "POST" and path in OPENAI_CHAT + (OPENAI_COMPLETION,):
        return "openai"
    if method in ("POST", "PUT") and path == "/generate":
        return "generate"
    if method == "POST" and path == _vertex_route():
        return "vertex"
    return None


def merge_header(method: str, path: str, body: Optional[dict], header: str) -> dict:
    """The X-Length-Control header's fields, merged into the body (raises RequestError)."""
    try:
        fields = json.loads(header)
    except ValueError:
        raise RequestError(f"{HEADER} must be a JSON object of length fields", HEADER) from None
    if not isinstance(fields, dict):
        raise RequestError(f"{HEADER} must be a JSON object of length fields", HEADER)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(f"{HEADER} may carry only {', '.join(FIELDS)}; got {unknown[0]!r}",
                           HEADER)
    route = _length_route(method, path)
    if route is None or not isinstance(body, dict):
        raise RequestError(f"{HEADER} is not supported on {method} {path}; length control is "
                           f"served on {SUPPORTED} (with a JSON object body)", HEADER)
    target = body
    if route == "vertex":
        target = body.get("parameters")
        if target is None:
            target = body["parameters"] = {}
        if not isinstance(target, dict):
            raise RequestError("parameters must be an object to take length fields", HEADER)
    for name, value in fields.items():
        if name in target:
            raise RequestError(f"{name} is given both in the body and in {HEADER}", name)
        target[name] = value
    return body


def rewrite_body(method: str, path: str, body: dict) -> bool:
    """Validate one JSON body and move its length fields (raises RequestError); True if the
    body changed."""
    where = find_private_key(body)
    if where is not None:
        raise RequestError(f"{where} is reserved for the server's own use", WIRE_NAME)
    changed = check_sampling_values(body)
    return _rewrite_length_fields(method, path, body) or changed


def _rewrite_length_fields(method: str, path: str, body: dict) -> bool:
    route = _length_route(method, path)
    if route == "openai":
        if not any(f in body for f in FIELDS):
            return False
        limits = ("max_tokens",) if path == OPENAI_COMPLETION else ("max_completion_tokens",
                                                                   "max_tokens")
        rewrite_sampling(body, body, limit_fields=limits)
        return True
    if route == "generate":
        return _rewrite_generate(body)
    if route == "vertex":
        _refuse_fields(body, f"{path} (put them in `parameters`)")
        params = body.get("parameters")
        return isinstance(params, dict) and _rewrite_generate(params)
    _refuse_fields(body, path)
    for key in ("sampling_params", "parameters", "options"):
        nested = body.get(key)
        for item in nested if isinstance(nested, list) else [nested]:
            if isinstance(item, dict):
                _refuse_fields(item, path)
    return False


# SGLang's scheduler packs every request's top_k into an int32 tensor and its sampling_seed into
# an int64 one, outside any per-request error handling: one value past them stops the server.
_INT_BOUNDS = {"top_k": 2**31 - 1, "sampling_seed": 2**63 - 1}


def check_sampling_values(body: dict) -> bool:
    """`n` / `best_of` above the server's cap, and `top_k` / `sampling_seed` past what the
    scheduler can hold, wherever a route reads them: 400 naming the field. A null `n` /
    `best_of` in sampling params is dropped (True: the body changed). Other wrong types are
    left to SGLang's own validation (it answers them with 400/422)."""
    changed = False
    nodes = [body]
    for key in ("sampling_params", "parameters"):
        nested = body.get(key)
        for item in nested if isinstance(nested, list) else [nested]:
            if isinstance(item, dict):
                nodes.append(item)
                inner = item.get("sampling_params")
                nodes.extend(i for i in (inner if isinstance(inner, list) else [inner])
                             if isinstance(i, dict))
    for node in nodes:
        for field in ("n", "best_of"):
            if field in node and node[field] is None and node is not body:
                del node[field]  # null is "not given"; SGLang's /generate answered it with 500
                changed = True
            v = node.get(field)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > _max_n:
                raise RequestError(f"{field} must be at most {_max_n} on this server "
                                   f"(--lenvm-max-n), got {v}", field)
        for field, bound in _INT_BOUNDS.items():
            v = node.get(field)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (
                    -bound - 1 <= v <= bound):
                raise RequestError(f"{field} must be at most {bound} in size, got {v}", field)
    return changed


def _refuse_fields(node: dict, where: str) -> None:
    for f in FIELDS:
        if f in node:
            raise RequestError(f"{f} is not supported on {where}; length control is served on "
                               f"{SUPPORTED}", f)


_FORM_FIELD = re.compile(rb'name="(%s)"' % b"|".join(f.encode() for f in FIELDS))


def _form_field(content_type: str, raw: bytes) -> Optional[str]:
    """A public field sent as a form field (multipart or urlencoded), or None."""
    if content_type.startswith("multipart/form-data"):
        m = _FORM_FIELD.search(raw)
        return m.group(1).decode() if m else None
    if content_type.startswith("application/x-www-form-urlencoded"):
        keys = parse_qs(raw.decode("latin-1"), keep_blank_values=True)
        return next((f for f in FIELDS if f in keys), None)
    return None


class LengthFieldsMiddleware:
    """Pure ASGI middleware: every request with a body passes through `rewrite_body`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        passed_front_door.set(True)
        method = scope.get("method")
        if method not in ("POST", "PUT", "PATCH"):
            if _header(scope) is not None:
                return await httputil.send_error(
                    send, f"{HEADER} is not supported on {method} {scope.get('path', '')}; "
                          f"length control is served on {SUPPORTED}", HEADER)
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        path = scope.get("path", "")
        try:
            body = json.loads(raw) if raw else None
            is_json = True
        except RecursionError:
            return await httputil.send_error(send, "request body is nested too deeply", "body")
        except ValueError:
            body, is_json = None, False  # not JSON: SGLang answers it (400/422) ...
            content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            field = _form_field(content_type.lower(), raw)  # ... unless it is a form with ours
            if field is not None:
                return await httputil.send_error(
                    send, f"{field} is not supported on {path}; length control is served "
                          f"on {SUPPORTED}", field)
        if raw and is_json and not isinstance(body, dict) and path in _json_object_routes():
            return await httputil.send_error(send, "request body must be a JSON object", "body")
        header = _header(scope)
        if header is not None:
            try:
                body = merge_header(method, path, body, header)
            except RequestError as e:
                return await httputil.send_error(send, str(e), e.param)
        if isinstance(body, dict):
            try:
                if rewrite_body(method, path, body) or header is not None:
                    raw = json.dumps(body).encode()
            except RequestError as e:
                return await httputil.send_error(send, str(e), e.param)
        elif is_json and raw:
            where = find_private_key(body)
            if where is not None:
                return await httputil.send_error(
                    send, f"{where} is reserved for the server's own use", WIRE_NAME)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        scope = dict(scope, headers=headers)
        await self.app(scope, _replay([{"type": "http.request", "body": raw,
                                        "more_body": False}], receive), send)


def _header(scope) -> Optional[str]:
    """The X-Length-Control header's value (the last one if repeated), or None."""
    value = None
    for k, v in scope.get("headers", ()):
        if k.lower() == HEADER.lower().encode():
            value = v.decode("latin-1")
    return value


def _json_object_routes():
    return (*OPENAI_CHAT, OPENAI_COMPLETION, "/generate", _vertex_route())


def _replay(messages, then=None):
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def configure(config: Optional[LenVMConfig], max_n: int = DEFAULT_MAX_N) -> None:
    global _config, _max_n
    _config, _max_n = config, max_n


def install(config: Optional[LenVMConfig], max_n: int = DEFAULT_MAX_N) -> None:
    """Wire the middleware and our endpoints into SGLang's HTTP app (launcher process)."""
    configure(config, max_n)
    from sglang.srt.entrypoints.http_server import app

    app.add_middleware(LengthFieldsMiddleware)
    from sglang_lenvm import endpoints

    endpoints.install(app, config)


