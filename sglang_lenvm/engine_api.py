"""Length control through SGLang's offline Engine API.

    from sglang_lenvm import engine_api
    engine = engine_api.Engine(model_path=BASE, lenvm_path=LENVM)   # sglang.Engine + LenVM
    out = engine.generate("Describe the sea.", {"max_new_tokens": 200,
                                                "length_target": 60, "length_mode": "at_most"})
    out["meta_info"]["lenvm_predicted_length"]

The public fields go in the sampling params, as on /generate. Without an HTTP layer there is
no middleware, so a hook on TokenizerManager.generate_request does its work for calls that did
not come through it: the fields are validated (RequestError, a ValueError naming the field) and
moved into the private form, and a caller's own `custom_params.__lenvm` is refused.
"""

from __future__ import annotations

from typing import Optional

from sglang.srt.plugins.hook_registry import HookType

from sglang_lenvm import api
from sglang_lenvm.schema import PARAMS_KEY, WIRE_NAME, RequestError

TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"


def prepare(obj, context_len: Optional[int]) -> None:
    """Validate and convert a GenerateReqInput's length fields (raises RequestError)."""
    sps = obj.sampling_params
    if sps is None:
        return
    items = [dict(sp) if isinstance(sp, dict) else sp for sp in
             (sps if isinstance(sps, list) else [sps])]
    # The bounds the HTTP middleware checks on every route (a top_k past int32 stops the
    # scheduler, whoever sends it).
    api.check_sampling_values({"sampling_params": items})
    for sp in items:
        if not isinstance(sp, dict):
            continue
        cp = sp.get("custom_params")
        if isinstance(cp, dict) and PARAMS_KEY in cp:
            raise RequestError(f"{WIRE_NAME} is reserved for the server's own use", WIRE_NAME)
        api.rewrite_sampling(sp, sp, limit_fields=("max_new_tokens",), context_len=context_len)
    obj.sampling_params = items if isinstance(sps, list) else items[0]


def _around_generate_request(orig, tm, obj, *args, **kwargs):
    from sglang.srt.managers.io_struct import GenerateReqInput

    from sglang_lenvm import responses

    if isinstance(obj, GenerateReqInput) and not api.passed_front_door.get():
        prepare(obj, getattr(getattr(tm, "model_config", None), "context_len", None))
    # One hook per target: the stream collector of responses.py rides on this one.
    return responses.around_generate_request(orig, tm, obj, *args, **kwargs)


HOOKS = [(f"{TOKENIZER_MANAGER}.generate_request", _around_generate_request, HookType.AROUND)]


def Engine(*, lenvm_path: str, lenvm_gamma: Optional[float] = None, **kwargs):
    """`sglang.Engine(**kwargs)` with a co-located LenVM (same checks as the server).

    The server's --lenvm-* flags are keyword arguments here: lenvm_top_k, lenvm_equal_distance,
    lenvm_equal_max_overshoot, lenvm_plausibility, lenvm_equal_softness, lenvm_sentence_end
    (every LenVMConfig field). On a machine without a
    GPU the CPU defaults of `launch_server` apply unless given.
    """
    import torch

    from sglang_lenvm import plugin
    from sglang_lenvm.launch_server import CPU_MAX_TOTAL_TOKENS, make_config
    from sglang_lenvm.runtime.compat import check_server_args

    if not torch.cuda.is_available():
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("dtype", "float32")
        if "mem_fraction_static" not in kwargs:
            kwargs.setdefault("max_total_tokens", CPU_MAX_TOTAL_TOKENS)
    base = kwargs.get("tokenizer_path") or kwargs.get("model_path")
    settings = {k[len("lenvm_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("lenvm_")}
    config = make_config(lenvm_path, base, gamma=lenvm_gamma, **settings)
    check_server_args(_Args(kwargs))
    config.to_env()  # the Engine's scheduler processes read it
    plugin.activate(config)
    import sglang

    return sglang.Engine(**kwargs)


class _Args:
    """Engine keyword arguments read like ServerArgs (missing ones are None)."""

    def __init__(self, kwargs):
        self._kw = kwargs

    def __getattr__(self, name):
        return self._kw.get(name)


__all__ = ["Engine", "prepare", "HOOKS"]
