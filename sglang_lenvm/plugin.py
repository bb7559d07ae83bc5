"""The `sglang.srt.plugins` entry point.

SGLang calls `register()` in every one of its processes (launcher, scheduler, detokenizer).
It always applies the CPU patch (when there is no GPU) and registers our model classes; the
LenVM hooks are installed only when a LenVM is configured (see `config.py`), so that plain
`sglang.launch_server` runs are untouched by this package.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _patch_cpu_rotary() -> None:
    # On a CPU-only machine SGLang's rotary embedding imports `vllm._custom_ops`, which does
    # not exist. The module flag `_is_mps` routes it to the native torch implementation.
    import torch

    if torch.cuda.is_available():
        return
    import sglang.srt.layers.rotary_embedding.base as rotary_base

    rotary_base._is_mps = True


def _no_pynccl_on_cpu(orig, group_ranks, local_rank, backend, *args, **kwargs):
    if not args and kwargs.get("use_pynccl") is None:
        kwargs["use_pynccl"] = False
    return orig(group_ranks, local_rank, backend, *args, **kwargs)


def _patch_cpu_parallel() -> None:
    # With --tp-size > 1 on a CPU-only machine, SGLang's generic platform asks for a PyNccl
    # communicator in every group it builds (it skips it only for out-of-tree platforms that
    # say they lack it), and PyNccl needs a CUDA device. Without it the groups fall back to
    # torch.distributed on gloo, which is what SGLang's own CPU path uses.
    import torch

    if torch.cuda.is_available():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.distributed.parallel_state.init_model_parallel_group",
                          _no_pynccl_on_cpu, HookType.AROUND)


def register() -> None:
    _patch_cpu_rotary()
    _patch_cpu_parallel()

    from sglang.srt.models.registry import ModelRegistry

    ModelRegistry.register("sglang_lenvm.models", overwrite=True)

    from sglang_lenvm.config import LenVMConfig

    config = LenVMConfig.from_env()
    if config is not None:
        activate(config, apply=False)


def activate(config, apply: bool = True) -> None:
    """Register every LenVM hook for `config` (SGLang applies them after the plugins ran;
    `apply` does it now, for a process whose plugins were already loaded)."""
    from sglang_lenvm import api
    from sglang_lenvm.runtime import hooks

    api.configure(config)
    hooks.install(config)
    if apply:
        from sglang.srt.plugins.hook_registry import HookRegistry

        HookRegistry.apply_hooks()
