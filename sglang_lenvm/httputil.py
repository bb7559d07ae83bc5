"""Small HTTP helpers shared by the front door and our endpoints."""

from __future__ import annotations

import json
from typing import Optional


def error_body(message: str, param: Optional[str], code: int = 400) -> dict:
    """An OpenAI-style error object."""
    return {"object": "error", "message": message, "type": "BadRequestError", "param": param,
            "code": code}


async def send_error(send, message: str, param: Optional[str], code: int = 400) -> None:
    """Answer an ASGI request with an error, without calling the app."""
    payload = json.dumps(error_body(message, param, code)).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def tokenizer_manager():
    """SGLang's TokenizerManager in the HTTP process (None before the server is up)."""
    from sglang.srt.entrypoints import http_server

    state = http_server._global_state
    return state.tokenizer_manager if state is not None else None


def context_len() -> Optional[int]:
    mc = getattr(tokenizer_manager(), "model_config", None)
    return getattr(mc, "context_len", None)
