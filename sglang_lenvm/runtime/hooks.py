"""Where the LenVM enters SGLang: HookRegistry hooks, installed by the plugin when configured.

Scheduler start-up (scheduler process):
  maybe_init_draft_worker  -> build the LenVM runner (weights load before KV sizing)
  DefaultPoolConfigurator  -> charge the LenVM's KV bytes per token to SGLang's KV budget
  init_memory_pools        -> share slot table + allocator, allocate the LenVM KV pool
  init_all_attention_backends -> the LenVM's attention backends
Per batch (lifecycle of the per-request length state, like penaltylib):
  SamplingBatchInfo.adjusted_from_schedule_batch / adjusted_filter_batch / adjusted_merge_batch,
  and copy_for_forward (the forward gets a shallow copy of the sampling info).
Per step:
  ModelRunner.forward (AFTER)            -> KV mirror of prefill batches
  ModelRunner.sample (AROUND)            -> hands the batch to the logits hook, attaches outputs
  ModelRunner._preprocess_logits (AFTER) -> candidate scoring on the processed logits
Outputs: SchedulerOutputStreamer.is_request_level_customized_info_key, Scheduler.get_internal_state.
"""

from __future__ import annotations

import logging
from typing import Optional

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_lenvm.config import LenVMConfig

logger = logging.getLogger(__name__)

_config: Optional[LenVMConfig] = None
_worker = None  # the scheduler process's LenVMWorker

SCHED = "sglang.srt.managers.scheduler.Scheduler"
SBI = "sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo"
RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"


def worker():
    return _worker


def install(config: LenVMConfig) -> None:
    global _config
    _config = config
    reg = HookRegistry.register
    reg(f"{SCHED}.maybe_init_draft_worker", _build_worker, HookType.AFTER)
    reg("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.__init__",
        _charge_kv_budget, HookType.AFTER)
    reg(f"{SCHED}.init_memory_pools", lambda _r, sched: _worker.attach_pools(), HookType.AFTER)
    reg(f"{SCHED}.init_all_attention_backends", lambda _r, sched: _worker.init_attention(),
        HookType.AFTER)
    reg(f"{SCHED}.get_internal_state", _internal_state, HookType.AFTER)
    reg(f"{SBI}.adjusted_from_schedule_batch", _state_build, HookType.AFTER)
    reg(f"{SBI}.adjusted_filter_batch", _state_filter, HookType.AFTER)
    reg(f"{SBI}.adjusted_merge_batch", _state_merge, HookType.AFTER)
    reg(f"{SBI}.copy_for_forward", _state_copy, HookType.AFTER)
    reg(f"{RUNNER}.forward", _after_forward, HookType.AFTER)
    reg(f"{RUNNER}.sample", _around_sample, HookType.AROUND)
    reg(f"{RUNNER}._preprocess_logits", _after_preprocess_logits, HookType.AFTER)
    reg("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
        ".is_request_level_customized_info_key", _request_level_key, HookType.AROUND)


# ---- start-up ----

def _build_worker(_result, sched) -> None:
    global _worker
    from sglang_lenvm.runtime.compat import check_server_args
    from sglang_lenvm.runtime.worker import LenVMWorker

    check_server_args(sched.server_args)
    _worker = LenVMWorker(_config, sched)


def _charge_kv_budget(_result, pool_configurator, kvc) -> None:
    # SGLang sizes the KV pool as available_bytes // bytes_per_token. Adding the LenVM's bytes
    # per token (EAGLE drafts are charged the same way) makes both pools fit the budget.
    if _worker is not None and not kvc.is_draft_worker:
        pool_configurator._cell_size += _worker.kv_bytes_per_token()


def _internal_state(result, sched, *args, **kwargs):
    if _worker is not None:
        from sglang_lenvm.runtime.stats import worker_stats

        result.internal_state["lenvm"] = worker_stats(_worker, sched)
    return result


# ---- length state lifecycle ----

def _state_build(_result, info, batch, vocab_size) -> None:
    from sglang_lenvm.runtime.length_state import LengthState

    info.lenvm_state = None
    if _worker is not None:
        info.lenvm_state = LengthState.build(batch.reqs, info.device, _config.top_k,
                                             _config.max_top_k, _config.equal_max_overshoot)


def _state_filter(_result, info, keep, keep_device) -> None:
    state = getattr(info, "lenvm_state", None)
    if state is not None:
        info.lenvm_state = state.filter(keep, keep_device)


def _state_merge(_result, info, other) -> None:
    from sglang_lenvm.runtime.length_state import merge_optional

    mine, theirs = getattr(info, "lenvm_state", None), getattr(other, "lenvm_state", None)
    if mine is None and theirs is None:
        return
    # merge_batch has already concatenated the batch tensors: len(info) is the merged size.
    other_len = len(other)
    info.lenvm_state = merge_optional(mine, len(info) - other_len, theirs, other_len, info.device)


def _state_copy(result, info):
    result.lenvm_state = getattr(info, "lenvm_state", None)
    return result


# ---- per step ----

def _is_target(runner) -> bool:
    return _worker is not None and runner is _worker.target


def _after_forward(result, runner, forward_batch, *args, **kwargs):
    if not _is_target(runner):
        return result
    state = getattr(forward_batch.sampling_info, "lenvm_state", None)
    mode = forward_batch.forward_mode
    if state is not None and state.any_active and mode.is_extend() and not mode.is_decode():
        forward_batch.lenvm_last_z = _worker.mirror_extend(forward_batch)
    return result


def _around_sample(orig, runner, logits_output, forward_batch, *args, **kwargs):
    if not _is_target(runner):
        return orig(runner, logits_output, forward_batch, *args, **kwargs)
    runner._lenvm_forward_batch = forward_batch
    try:
        out = orig(runner, logits_output, forward_batch, *args, **kwargs)
    finally:
        runner._lenvm_forward_batch = None
    extra = getattr(forward_batch, "lenvm_output", None)
    if extra is not None:
        extra = extra.with_chosen(out)
        from sglang.srt.managers.auxiliary_output import append_auxiliary_output

        logits_output.auxiliary_device_output = append_auxiliary_output(
            logits_output.auxiliary_device_output, extra)
    return out


def _after_preprocess_logits(result, runner, logits_output, sampling_info, *args, **kwargs):
    forward_batch = getattr(runner, "_lenvm_forward_batch", None)
    if forward_batch is None or not _is_target(runner):
        return result
    from sglang_lenvm.runtime.scorer import score_step

    try:
        score_step(_worker, logits_output, sampling_info, forward_batch)
    except Exception:  # never take the batch down: its requests sample unguided this step
        logger.exception("LenVM scoring failed; this step samples without guidance")
    return result


def _request_level_key(orig, streamer, key):
    from sglang_lenvm.runtime.outputs import REQUEST_LEVEL_KEYS

    return key in REQUEST_LEVEL_KEYS or orig(streamer, key)
