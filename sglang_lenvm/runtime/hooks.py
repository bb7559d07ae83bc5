"""Where the LenVM enters SGLang: HookRegistry hooks, installed by the plugin when configured.

Scheduler start-up (scheduler process):
  maybe_init_draft_worker  -> check the set-up, build the LenVM runner (weights before KV sizing)
  DefaultPoolConfigurator  -> charge the LenVM's KV bytes per token and the scorer's
                              workspace to SGLang's KV budget
  init_memory_pools        -> share slot table + allocator, allocate the LenVM KV pool
  init_all_attention_backends -> the LenVM's attention backends; with a shared trunk, the
                              capture on the base model's decoder-layer class (its forward)
Per request:
  Scheduler._create_generation_req (AFTER) -> admission: validate, namespace, budget
Per batch (lifecycle of the per-request length state, like penaltylib):
  SamplingBatchInfo.adjusted_from_schedule_batch / adjusted_filter_batch / adjusted_merge_batch,
  and copy_for_forward (the forward gets a shallow copy of the sampling info).
Per step:
  ModelRunner.forward (AFTER)            -> KV mirror of prefill batches (LenVM rows only)
  ModelRunner.sample (AROUND)            -> hands the batch to the logits hook, attaches outputs;
                                            under --tp-size, ranks agree (tensor_parallel.py)
  ModelRunner._preprocess_logits (AFTER) -> candidate scoring on the processed logits
Outputs: SchedulerOutputStreamer.is_request_level_customized_info_key, Scheduler.get_internal_state.
HTTP / Engine process: `responses.HOOKS` (length_control in OpenAI responses) and
  `engine_api.HOOKS` (the Engine API's length fields).

Every hook body is fault-isolated (faults.py): an exception costs the requests it concerns
their guidance, never the scheduler. All hooks are registered in one `install` call, before
SGLang applies them (a hook registered on an already-patched target would be dropped), and
`verify_installed` checks that each one landed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, List, Optional, Tuple

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_lenvm.config import LenVMConfig

logger = logging.getLogger(__name__)

_config: Optional[LenVMConfig] = None
_worker = None  # the scheduler process's LenVMWorker
_installed: List[Tuple[str, Callable, HookType]] = []

SCHED = "sglang.srt.managers.scheduler.Scheduler"
SBI = "sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo"
RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"


def worker():
    return _worker


def scheduler_hooks() -> List[Tuple[str, Callable, HookType]]:
    return [
        (f"{SCHED}.maybe_init_draft_worker", _build_worker, HookType.AFTER),
        ("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.__init__",
         _charge_kv_budget, HookType.AFTER),
        (f"{SCHED}.init_memory_pools", _attach_pools, HookType.AFTER),
        (f"{SCHED}.init_all_attention_backends", _init_attention, HookType.AFTER),
        (f"{SCHED}.get_internal_state", _internal_state, HookType.AFTER),
        (f"{SCHED}._create_generation_req", _admit, HookType.AFTER),
        (f"{SBI}.adjusted_from_schedule_batch", _state_build, HookType.AFTER),
        (f"{SBI}.adjusted_filter_batch", _state_filter, HookType.AFTER),
        (f"{SBI}.adjusted_merge_batch", _state_merge, HookType.AFTER),
        (f"{SBI}.copy_for_forward", _state_copy, HookType.AFTER),
        (f"{RUNNER}.forward", _after_forward, HookType.AFTER),
        (f"{RUNNER}.sample", _around_sample, HookType.AROUND),
        (f"{RUNNER}._preprocess_logits", _after_preprocess_logits, HookType.AFTER),
        (f"{STREAMER}.is_request_level_customized_info_key", _request_level_key,
         HookType.AROUND),
    ]


def install(config: LenVMConfig) -> None:
    """Register every hook of this package (scheduler, HTTP/Engine side)."""
    global _config
    _config = config
    from sglang_lenvm import engine_api, responses

    for target, fn, kind in scheduler_hooks() + responses.HOOKS + engine_api.HOOKS:
        if (target, fn, kind) not in _installed:
            HookRegistry.register(target, fn, kind)
            _installed.append((target, fn, kind))


def missing_hooks() -> List[str]:
    """Targets of our registered hooks whose current function does not call our hook."""
    import pkgutil

    missing = []
    for target, fn, _kind in _installed:
        owner, attr = target.rsplit(".", 1)
        try:
            current = getattr(pkgutil.resolve_name(owner), attr)
        except Exception:  # noqa: BLE001 - an unresolvable target is what we report
            missing.append(target)
            continue
        current = getattr(current, "__func__", current)
        found = False
        while current is not None and not found:
            found = any(_cell(c) is fn for c in (getattr(current, "__closure__", None) or ()))
            current = getattr(current, "__wrapped__", None)
        if not found:
            missing.append(target)
    return missing


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:
        return None


def verify_installed() -> None:
    missing = missing_hooks()
    if missing:
        raise RuntimeError("sglang-lenvm: these SGLang hook points did not take our hooks (a "
                           "different SGLang version?): " + ", ".join(missing))


# ---- start-up ----

def _build_worker(_result, sched) -> None:
    global _worker
    from sglang_lenvm.runtime.compat import check_server_args
    from sglang_lenvm.runtime.worker import LenVMWorker

    verify_installed()
    check_server_args(sched.server_args)
    _worker = LenVMWorker(_config, sched)
    if sched.server_args.enable_metrics:
        from sglang.srt.runtime_context import get_parallel

        from sglang_lenvm.runtime.metrics import LenVMMetrics

        _worker.metrics = LenVMMetrics(sched.server_args.served_model_name,
                                       get_parallel().tp_rank, get_parallel().dp_rank or 0)


def _charge_kv_budget(_result, pool_configurator, kvc) -> None:
    # SGLang sizes the KV pool as available_bytes // bytes_per_token. Adding the LenVM's bytes
    # per token (EAGLE drafts are charged the same way) makes both pools fit the budget.
    if _worker is not None and not kvc.is_draft_worker:
        pool_configurator._cell_size += _worker.kv_bytes_per_token()
        # The scorer's bounded workspace comes out of the same budget, before the pools.
        pool_configurator._fixed_overhead_bytes += _worker.workspace_bytes()


def _attach_pools(_result, sched) -> None:
    from sglang_lenvm.runtime.compat import check_runtime

    check_runtime(sched, _worker.model_config)
    _worker.attach_pools()


def _init_attention(_result, sched) -> None:
    _worker.init_attention()
    if _worker.trunk:
        _install_trunk_capture(type(_worker.trunk_layer))


def _install_trunk_capture(layer_cls) -> None:
    """The shared trunk's capture, on the base model's decoder-layer class (known only once
    the base model is built): registered and applied here, in the scheduler process."""
    target = f"{layer_cls.__module__}.{layer_cls.__qualname__}.forward"
    entry = (target, _capture_trunk, HookType.AROUND)
    if entry not in _installed:
        HookRegistry.register(*entry)
        _installed.append(entry)
        HookRegistry.apply_hooks()
    verify_installed()


def _capture_trunk(orig, layer, positions, hidden_states, forward_batch, *args, **kwargs):
    """At the base model's layer `trunk`, on batches with LenVM rows: keep the residual
    stream entering it (SGLang's own capture callback, as EAGLE-3 uses it), which becomes
    forward_batch.lenvm_trunk [tokens, H]. Every other layer call passes straight through."""
    if _worker is None or layer is not _worker.trunk_layer:
        return orig(layer, positions, hidden_states, forward_batch, *args, **kwargs)
    state = getattr(getattr(forward_batch, "sampling_info", None), "lenvm_state", None)
    if state is None or not state.any_active:
        return orig(layer, positions, hidden_states, forward_batch, *args, **kwargs)
    theirs = kwargs.get("capture_output")

    def keep(value, owned):
        # On the step's sampling info: the model sees a copy of the runner's ForwardBatch,
        # and both share it. _after_forward moves it to the runner's ForwardBatch.
        forward_batch.sampling_info.lenvm_trunk = value if owned else value.clone()

    def capture(value, owned=False):
        from sglang_lenvm.runtime import faults

        # Inside the base model's forward: a failure here must not reach it. Without the
        # stream, the LenVM rows' mirror fails and they are quarantined (faults.isolated).
        faults.guarded("trunk", lambda: keep(value, owned))
        if theirs is not None:
            theirs(value, owned=owned)

    kwargs["capture_output"] = capture
    return orig(layer, positions, hidden_states, forward_batch, *args, **kwargs)


def _internal_state(result, sched, *args, **kwargs):
    if _worker is not None:
        from sglang_lenvm.runtime import faults
        from sglang_lenvm.runtime.stats import tp_rank_summary, worker_stats

        stats = faults.guarded("stats", lambda: worker_stats(_worker, sched))
        # Every TP rank runs this for the same control request: rank 0 reports them all.
        every = faults.guarded("stats", lambda: _worker.tp.gather_stats(stats), default=[stats])
        if stats is not None:
            stats["tp_ranks"] = [tp_rank_summary(s) for s in every]
        result.internal_state["lenvm"] = stats
    return result


# ---- per request ----

def _admit(req, sched, recv_req=None, *args, **kwargs):
    if _worker is None:
        return req
    from sglang_lenvm.runtime.admission import admit

    admit(req, max_top_k=_config.max_top_k, context_len=sched.model_config.context_len,
          recv_req=recv_req, lenvm_vocab=_worker.candidate_vocab)
    return req


# ---- length state lifecycle ----

def _settings(device):
    from sglang_lenvm.runtime.length_state import Settings

    return Settings(device, _config.top_k, _config.max_top_k, _config.equal_max_overshoot)


def _state_build(_result, info, batch, vocab_size) -> None:
    from sglang_lenvm.runtime import faults
    from sglang_lenvm.runtime.attached import uses_lenvm
    from sglang_lenvm.runtime.length_state import LengthState

    info.lenvm_state = None
    if _worker is not None:
        info.lenvm_state = faults.guarded(
            "build", lambda: LengthState.build(batch.reqs, _settings(info.device)),
            [r for r in batch.reqs if uses_lenvm(r)])


def _state_filter(_result, info, keep, keep_device) -> None:
    from sglang_lenvm.runtime import faults

    state = getattr(info, "lenvm_state", None)
    if state is not None:
        info.lenvm_state = faults.guarded("filter", lambda: state.filter(keep, keep_device),
                                          [r for r in state.reqs if r is not None])


def _state_merge(_result, info, other) -> None:
    from sglang_lenvm.runtime import faults
    from sglang_lenvm.runtime.length_state import LengthState

    mine, theirs = getattr(info, "lenvm_state", None), getattr(other, "lenvm_state", None)
    if mine is None and theirs is None:
        return
    # merge_batch has already concatenated the batch tensors: len(info) is the merged size.
    other_len = len(other)
    mine_len = len(info) - other_len

    def merge():
        settings = (mine or theirs).settings
        a = mine or LengthState.empty(mine_len, settings)
        b = theirs or LengthState.empty(other_len, settings)
        return a.merge(b)

    reqs = [r for s in (mine, theirs) if s is not None for r in s.reqs if r is not None]
    info.lenvm_state = faults.guarded("merge", merge, reqs)


def _state_copy(result, info):
    result.lenvm_state = getattr(info, "lenvm_state", None)
    return result


# ---- per step ----

def _is_target(runner) -> bool:
    return _worker is not None and runner is _worker.target


def _after_forward(result, runner, forward_batch, *args, **kwargs):
    if not _is_target(runner):
        return result
    info = forward_batch.sampling_info
    trunk = getattr(info, "lenvm_trunk", None)
    if trunk is not None:
        forward_batch.lenvm_trunk, info.lenvm_trunk = trunk, None
    state = getattr(info, "lenvm_state", None)
    mode = forward_batch.forward_mode
    if state is not None and state.any_active and mode.is_extend() and not mode.is_decode():
        from sglang_lenvm.runtime import faults
        from sglang_lenvm.runtime.mirror import mirror_prefill

        with _timed("mirror"):
            faults.guarded("mirror", lambda: mirror_prefill(_worker, forward_batch, state),
                           [r for r in state.reqs if r is not None])
    return result


def _around_sample(orig, runner, logits_output, forward_batch, *args, **kwargs):
    if not _is_target(runner):
        return orig(runner, logits_output, forward_batch, *args, **kwargs)
    runner._lenvm_forward_batch = forward_batch
    try:
        out = orig(runner, logits_output, forward_batch, *args, **kwargs)
    finally:
        runner._lenvm_forward_batch = None
    state = getattr(forward_batch.sampling_info, "lenvm_state", None)
    steered = state is not None and state.any_active
    from sglang_lenvm.runtime import faults

    # Tensor parallelism only (no-ops at tp 1): every rank, same tokens and same quarantines.
    # A failed collective costs the step's LenVM requests their guidance, not the scheduler.
    if steered and out is not None:
        faults.guarded("tensor_parallel", lambda: _worker.tp.agree_on_tokens(out),
                       _reqs_of(forward_batch))
    outputs = getattr(forward_batch, "lenvm_output", None)
    if outputs:
        from sglang_lenvm.runtime.outputs import attach
        from sglang_lenvm.runtime.sync_guard import guarded_step

        with guarded_step():
            faults.guarded("outputs", lambda: attach(logits_output, outputs, out),
                           _reqs_of(forward_batch))
    if steered:
        faults.guarded("tensor_parallel", lambda: _worker.tp.agree_on_faults(state.reqs),
                       _reqs_of(forward_batch))
    return out


def _after_preprocess_logits(result, runner, logits_output, sampling_info, *args, **kwargs):
    forward_batch = getattr(runner, "_lenvm_forward_batch", None)
    if forward_batch is None or not _is_target(runner):
        return result
    state = getattr(sampling_info, "lenvm_state", None)
    if state is None or not state.any_active:  # no LenVM row: nothing to do, nothing to time
        return result
    from sglang_lenvm.runtime import faults
    from sglang_lenvm.runtime.scorer import score_step
    from sglang_lenvm.runtime.sync_guard import guarded_step

    with _timed("scoring"), guarded_step():
        faults.guarded("scoring", lambda: score_step(_worker, logits_output, sampling_info,
                                                     forward_batch), _reqs_of(forward_batch))
    return result


def _timed(phase: str):
    """Prometheus step time and counters (--enable-metrics), for steps with LenVM rows."""
    metrics = _worker.metrics
    return contextlib.nullcontext() if metrics is None else _observed(metrics, phase)


@contextlib.contextmanager
def _observed(metrics, phase: str):
    from sglang_lenvm.runtime import faults

    with metrics.time_phase(phase):
        yield
    faults.guarded("metrics", lambda: metrics.sync({**_worker.stats, **faults.counters}))


def _reqs_of(forward_batch):
    state = getattr(forward_batch.sampling_info, "lenvm_state", None)
    return [r for r in state.reqs if r is not None] if state is not None else []


def _request_level_key(orig, streamer, key):
    from sglang_lenvm.runtime.outputs import REQUEST_LEVEL_KEYS

    return key in REQUEST_LEVEL_KEYS or orig(streamer, key)
