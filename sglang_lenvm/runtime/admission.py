"""Admission: the scheduler's own check of every request, right after SGLang creates its Req.

Whatever reaches the scheduler is validated again here (the front door may be bypassed, e.g.
by an Engine user's custom_params). A malformed request is finished with an error for that
request alone (HTTP 400 through SGLang's own abort path); nothing here raises.

For a LenVM request this also:
- refuses prompt token ids the LenVM has no embedding for (a base model whose embedding is
  padded past the tokenizer, given raw `input_ids`): it could not read the prompt;
- grants the LenVM radix namespace (extra_key "lenvm|<caller's key>"); any other request that
  claims it is moved out, so the namespace only ever holds mirrored KV;
- applies the output budget: the one the front door resolved from the target when the request
  set none, and in every case at_most's cap (max_new_tokens <= T) and at_least's floor
  (min_new_tokens = T - 1, i.e. no stop token before the T-th), both enforced by SGLang itself
  so they hold also when LenVM guidance is off for a step or for good.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Optional

from sglang_lenvm.runtime import faults
from sglang_lenvm.schema import (
    PARAMS_KEY,
    LengthParams,
    RequestError,
    namespace,
    outside_namespace,
)

logger = logging.getLogger(__name__)


def admit(req, *, max_top_k: int, context_len: int, recv_req=None,
          lenvm_vocab: Optional[int] = None) -> None:
    """Parse and apply a new request's length parameters (AFTER _create_generation_req;
    `recv_req` is the tokenized request it was made from; `lenvm_vocab`: the LenVM's
    embedding size where it is smaller than the base model's, else None)."""
    req.lenvm_params = None
    cp = req.sampling_params.custom_params
    if not isinstance(cp, dict) or PARAMS_KEY not in cp:
        req.extra_key = outside_namespace(req.extra_key)
        return
    raw = cp[PARAMS_KEY]
    try:
        faults.inject("admit", [req.rid])
        params = LengthParams.from_wire(raw, max_top_k=max_top_k, context_len=context_len)
        _check_request(req, params, recv_req)
        if params.uses_lenvm:
            _check_token_ids(req, lenvm_vocab)
            _apply(req, params)
        else:
            req.extra_key = outside_namespace(req.extra_key)
    except RequestError as e:
        _refuse(req, str(e), HTTPStatus.BAD_REQUEST, "BadRequestError")
    except Exception as e:  # noqa: BLE001 - a bug here must cost one request, not the server
        logger.exception("LenVM admission failed for request %s", req.rid)
        faults.counters["faults"] += 1
        _refuse(req, f"LenVM admission failed ({type(e).__name__}: {e})",
                HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")


def _check_request(req, params: LengthParams, recv_req) -> None:
    sp = req.sampling_params
    # The LenVM reads token ids: input the ids do not describe would be scored as if they did.
    for name in ("input_embeds", "mm_inputs", "positional_embed_overrides"):
        if getattr(recv_req, name, None) is not None:
            raise RequestError(f"{name} cannot be combined with length control (the LenVM "
                               f"reads token ids only)", name)
    if not params.steers:
        return
    if req.custom_logit_processor:
        raise RequestError("custom_logit_processor cannot be combined with length guidance",
                           "custom_logit_processor")
    if (getattr(sp, "beam_width", None) or 1) > 1:
        raise RequestError("beam search cannot be combined with length guidance", "beam_width")
    limit = sp.max_new_tokens
    if limit == 0:  # prefill only (below): nothing to check
        return
    if (params.mode in ("equal", "at_least") and params.budget is None
            and not params.budget_open and limit is not None and limit < params.target):
        raise RequestError(f"max_new_tokens ({limit}) is below the length target "
                           f"({params.target})", "max_new_tokens")


def _check_token_ids(req, lenvm_vocab: Optional[int]) -> None:
    if lenvm_vocab is None or not len(req.origin_input_ids):
        return
    top = max(req.origin_input_ids)
    if top >= lenvm_vocab:
        raise RequestError(f"input_ids contains token id {top}, outside the LenVM's vocabulary "
                           f"({lenvm_vocab} tokens): length control cannot read this prompt",
                           "input_ids")


def _apply(req, params: LengthParams) -> None:
    sp = req.sampling_params
    req.extra_key = namespace(req.extra_key)
    req.lenvm_params = params
    if sp.max_new_tokens == 0:
        # Prefill only: SGLang sends one such copy of an n > 1 request first, to cache the
        # prompt the n samples share (the LenVM mirrors it too, so they share that as well).
        # A budget here would make it generate a whole output that nobody reads.
        return
    if params.budget is not None:
        sp.max_new_tokens = params.budget
    elif params.budget_open:
        sp.max_new_tokens = None  # SGLang: what the context leaves
    if params.mode == "at_most":
        sp.max_new_tokens = min(sp.max_new_tokens or params.target, params.target)
    elif params.mode == "at_least":
        sp.min_new_tokens = max(sp.min_new_tokens or 0, params.target - 1)


def _refuse(req, message: str, status, err_type: str) -> None:
    cp = req.sampling_params.custom_params
    if isinstance(cp, dict):
        cp.pop(PARAMS_KEY, None)
    req.lenvm_params = None
    req.extra_key = outside_namespace(req.extra_key)
    req.skip_radix_cache_insert = True
    req.set_finish_with_abort(message, status_code=status, err_type=err_type)
