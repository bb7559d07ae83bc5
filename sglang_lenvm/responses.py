"""Length-control results in OpenAI responses.

Every choice of a LenVM request gets a `length_control` object: what was asked (target, mode,
beta) and what the LenVM predicted (`predicted_length`, the total length it expected at the
prompt boundary), plus with `return_length_values` the value trace `values[t]` = p(s_t), the
LenVM's value of the state before token t (t = 0 is the prompt boundary; p ~ 1 - gamma^remaining).
Non-streaming responses carry it on each choice; streams send one extra chunk per choice, with
an empty delta and the `length_control` object, just before `data: [DONE]`.

Installed as HookRegistry hooks on SGLang's OpenAI serving classes (HOOKS; they only run in
the HTTP process). A request whose guidance stopped (faults.py) carries a `warning` saying
why; its `values` have null entries from there on.
"""

from __future__ import annotations

import contextvars
import json
from typing import Any, Optional

from sglang.srt.plugins.hook_registry import HookType

from sglang_lenvm.runtime.outputs import FALLBACK_KEY, FAULT_KEY, PREDICTED_KEY, VALUES_KEY
from sglang_lenvm.schema import PARAMS_KEY

CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
COMPLETION = "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion"

# Stream wrappers collect each choice's latest meta_info here (same asyncio task).
_collector: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar(
    "lenvm_stream_collector", default=None)


def request_params(request) -> Optional[dict]:
    cp = getattr(request, "custom_params", None)
    return cp.get(PARAMS_KEY) if isinstance(cp, dict) else None


def length_control(params: dict, meta_info: dict, n_tokens: Optional[int] = None) -> dict:
    out: dict[str, Any] = {
        "length_target": params.get("target"),
        "length_mode": params.get("mode"),
        "beta": params.get("beta", 0.0),
    }
    predicted = meta_info.get(PREDICTED_KEY)
    out["predicted_length"] = float(predicted[0]) if predicted else None
    if n_tokens is None:
        n_tokens = meta_info.get("completion_tokens")
    if params.get("return_values"):
        values = list(meta_info.get(VALUES_KEY) or [])
        if isinstance(n_tokens, int) and len(values) < n_tokens:  # the trace stopped at a fault
            values += [None] * (n_tokens - len(values))
        out["values"] = values
    warnings = []
    fallback = meta_info.get(FALLBACK_KEY) or []
    n_fallback = sum(1 for x in fallback if x)
    if n_fallback:
        warnings.append(f"the LenVM produced non-finite values at {n_fallback} step(s); "
                        f"those tokens were sampled without length guidance")
    faults = [(i, x) for i, x in enumerate(meta_info.get(FAULT_KEY) or []) if x]
    if faults:
        i, reason = faults[0]
        warnings.append(f"{reason}: from output token {i} on, this request was sampled without "
                        f"length guidance")
    if warnings:
        out["warning"] = "; ".join(warnings)
    return out


def _with_choices(response, ret, params, key_field="choices"):
    """Serialize the response model and add length_control to each choice."""
    from fastapi.responses import ORJSONResponse

    if not hasattr(response, "model_dump"):  # already an error response
        return response
    data = json.loads(response.model_dump_json())
    for choice in data.get(key_field, []):
        idx = choice.get("index", 0)
        if idx < len(ret):
            choice["length_control"] = length_control(params, ret[idx]["meta_info"])
    return ORJSONResponse(content=data)


def _around_build(orig, self, request, ret, created, *args, **kwargs):
    response = orig(self, request, ret, created, *args, **kwargs)
    params = request_params(request)
    return response if params is None else _with_choices(response, ret, params)


def _around_stream(orig, self, adapted_request, request, raw_request, *args, **kwargs):
    params = request_params(request)
    if params is None:
        return orig(self, adapted_request, request, raw_request, *args, **kwargs)
    return _stream_with_length(orig(self, adapted_request, request, raw_request, *args, **kwargs),
                               request, params, self)


async def _stream_with_length(chunks, request, params, serving):
    collected: dict = {}
    _collector.set(collected)
    incremental = bool(getattr(serving.tokenizer_manager, "incremental_streaming_output", False))
    try:
        async for chunk in chunks:
            if chunk.startswith("data: [DONE]"):
                for index in sorted(collected):
                    yield _length_chunk(request, index, params, collected[index], incremental)
            yield chunk
    finally:
        _collector.set(None)


def _length_chunk(request, index, params, metas, incremental) -> str:
    meta = dict(metas[-1])
    if incremental:  # each chunk carried only its own slice of the per-token values
        for key in (VALUES_KEY, FALLBACK_KEY, FAULT_KEY):
            meta[key] = [v for m in metas for v in (m.get(key) or [])]
        meta[PREDICTED_KEY] = next((m[PREDICTED_KEY] for m in metas if m.get(PREDICTED_KEY)), None)
    chat = hasattr(request, "messages")
    choice = {"index": index, "finish_reason": None,
              "length_control": length_control(params, meta)}
    if chat:
        choice["delta"] = {}
    else:
        choice["text"] = ""
    payload = {"id": meta.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
               "model": request.model, "choices": [choice]}
    return f"data: {json.dumps(payload)}\n\n"


def around_generate_request(orig, self, obj, *args, **kwargs):
    """Collect meta_info for a stream wrapper (called by engine_api's generate_request hook)."""
    collected = _collector.get()
    if collected is None:
        return orig(self, obj, *args, **kwargs)
    return _collect(orig(self, obj, *args, **kwargs), collected)


async def _collect(outputs, collected: dict):
    async for out in outputs:
        items = out if isinstance(out, list) else [out]
        for item in items:
            meta = item.get("meta_info") if isinstance(item, dict) else None
            if meta is not None:
                collected.setdefault(item.get("index", 0), []).append(
                    {k: meta.get(k) for k in ("id", "completion_tokens", VALUES_KEY,
                                              PREDICTED_KEY, FALLBACK_KEY, FAULT_KEY)})
        yield out


HOOKS = [
    (f"{CHAT}._build_chat_response", _around_build, HookType.AROUND),
    (f"{COMPLETION}._build_completion_response", _around_build, HookType.AROUND),
    (f"{CHAT}._generate_chat_stream", _around_stream, HookType.AROUND),
    (f"{COMPLETION}._generate_completion_stream", _around_stream, HookType.AROUND),
]
