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


def register() -> None:
    _patch_cpu_rotary()

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
