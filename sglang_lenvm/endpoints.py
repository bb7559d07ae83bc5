"""Extra HTTP endpoints: POST /v1/length/predict and GET /lenvm/stats."""

from __future__ import annotations

from typing import Optional

from fastapi import Request
from fastapi.responses import ORJSONResponse

from sglang_lenvm.config import LenVMConfig
from sglang_lenvm.httputil import error_body, tokenizer_manager
from sglang_lenvm.runtime.outputs import PREDICTED_KEY, VALUES_KEY
from sglang_lenvm.schema import PARAMS_KEY, LengthParams


def _error(message: str, param: Optional[str], code: int = 400) -> ORJSONResponse:
    return ORJSONResponse(error_body(message, param, code), status_code=code)


async def predict_length(request: Request):
    """The LenVM's predicted generation length for a prompt, without generating.

    Body: {"messages": [...]} (chat template applied) or {"prompt": "..."}.
    Returns the predicted length in tokens (EOS included), the raw value p at the prompt
    boundary, and the prompt's token count.
    """
    from sglang.srt.managers.io_struct import GenerateReqInput

    if _config is None:
        return _error("length prediction needs a LenVM (start the server with --lenvm-path)",
                      None)
    try:
        body = await request.json()
    except ValueError:
        return _error("body must be JSON", None)
    if not isinstance(body, dict):
        return _error("body must be a JSON object", None)
    messages, prompt = body.get("messages"), body.get("prompt")
    if (messages is None) == (prompt is None):
        return _error("give exactly one of 'messages' or 'prompt'", "messages")
    tm = tokenizer_manager()
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and
                isinstance(m.get("role"), str) for m in messages):
            return _error("messages must be a non-empty list of {role, content} objects",
                          "messages")
        try:
            input_ids = tm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                         tokenize=True)
        except Exception as e:  # a template that rejects these messages
            return _error(f"chat template failed: {e}", "messages")
        if isinstance(input_ids, dict) or hasattr(input_ids, "keys"):
            input_ids = input_ids["input_ids"]
        input_ids = list(input_ids)
    else:
        if not isinstance(prompt, str) or not prompt:
            return _error("prompt must be a non-empty string", "prompt")
        input_ids = tm.tokenizer.encode(prompt)
    context_len = tm.model_config.context_len
    if len(input_ids) >= context_len:
        return _error(f"prompt has {len(input_ids)} tokens, the context length is {context_len}",
                      "messages" if messages is not None else "prompt")
    obj = GenerateReqInput(
        input_ids=input_ids,
        sampling_params={"max_new_tokens": 1, "temperature": 0.0,
                         "custom_params": {
                             PARAMS_KEY: LengthParams(return_values=True).to_wire()}},
    )
    out = await tm.generate_request(obj, request).__anext__()
    meta = out["meta_info"]
    values = meta.get(VALUES_KEY) or [None]
    predicted = meta.get(PREDICTED_KEY) or [None]
    return ORJSONResponse({
        "object": "length.prediction",
        "predicted_length": predicted[0],
        "value": values[0],
        "gamma": _config.gamma,
        "prompt_tokens": len(input_ids),
        "cached_tokens": meta.get("cached_tokens", 0),
    })


async def lenvm_stats():
    """One entry per scheduler (data-parallel rank), in rank order (SGLang answers in the order
    the ranks reply)."""
    states = [s.get("lenvm") for s in await tokenizer_manager().get_internal_state()]
    states.sort(key=lambda s: s.get("dp_rank", 0) if isinstance(s, dict) else 0)
    return ORJSONResponse(states)


_config: Optional[LenVMConfig] = None


def install(app, config: Optional[LenVMConfig]) -> None:
    global _config
    _config = config
    app.add_api_route("/v1/length/predict", predict_length, methods=["POST"])
    app.add_api_route("/lenvm/stats", lenvm_stats, methods=["GET"])
