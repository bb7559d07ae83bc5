"""Set-ups the LenVM co-location cannot serve, refused at start-up with a message naming each.

Each refused option would break the invariant that the LenVM's KV cache mirrors the base
model's slot for slot, or make the LenVM read what it cannot (quantized KV, token ids past its
embedding). The launcher checks them before anything is loaded (`check_server_args`,
`check_models`); the scheduler checks the models again on the objects it really built
(`check_runtime`).
"""

from __future__ import annotations

from typing import List, Optional

QUANTIZED_KV_PREFIXES = ("fp8", "fp4", "nvfp4", "mxfp", "int8", "int4", "e4m3", "e5m2")


def _get(args, name, default=None):
    return getattr(args, name, default)


def check_server_args(args) -> None:
    problems = []
    if _get(args, "speculative_algorithm"):
        problems.append("--speculative-algorithm (its draft slots would collide with the LenVM's)")
    # Data parallelism: each scheduler owns its LenVM and its mirror. Tensor parallelism:
    # the LenVM is sharded over the base model's TP group, as SGLang shards a draft model.
    if (_get(args, "pp_size") or 1) > 1:
        problems.append("--pp-size > 1 (each pipeline stage holds some of the base model's "
                        "layers, while the LenVM is a whole second model scoring where the "
                        "last stage samples; use --tp-size or --dp-size)")
    if _get(args, "enable_mixed_chunk"):
        problems.append("--enable-mixed-chunk")
    if _get(args, "enable_hierarchical_cache"):
        problems.append("--enable-hierarchical-cache (host-offloaded KV is not mirrored)")
    if (_get(args, "disaggregation_mode") or "null") != "null":
        problems.append("--disaggregation-mode (prefill/decode disaggregation)")
    if _get(args, "enable_dp_attention"):
        problems.append("--enable-dp-attention")
    if (_get(args, "page_size") or 1) != 1:
        problems.append("--page-size other than 1")
    kv = str(_get(args, "kv_cache_dtype") or "auto").lower()
    if kv.startswith(QUANTIZED_KV_PREFIXES):
        problems.append(f"--kv-cache-dtype {kv} (the LenVM's star attention reads its KV "
                        f"unscaled; use auto)")
    if problems:
        raise ValueError("sglang-lenvm does not support: " + "; ".join(problems))


def model_problems(base_model_config, lenvm_vocab: Optional[int],
                   tokenizer_size: Optional[int]) -> List[str]:
    """What makes a base model / LenVM pair unservable (SGLang ModelConfig of the base)."""
    problems = []
    if getattr(base_model_config, "is_hybrid_swa", False):
        problems.append("a hybrid sliding-window base model (its sliding-window KV lives in a "
                        "second pool the LenVM cannot mirror)")
    if _mambaish(base_model_config):
        problems.append("a hybrid linear-attention / Mamba base model (its recurrent state is "
                        "not a KV cache the LenVM can mirror)")
    if lenvm_vocab is not None and tokenizer_size is not None and lenvm_vocab < tokenizer_size:
        problems.append(f"a LenVM whose embedding has {lenvm_vocab} rows, fewer than the "
                        f"{tokenizer_size} tokens of the tokenizer (it could not score them)")
    return problems


def check_models(base_model_config, lenvm_vocab: Optional[int],
                 tokenizer_size: Optional[int]) -> None:
    problems = model_problems(base_model_config, lenvm_vocab, tokenizer_size)
    if problems:
        raise ValueError("sglang-lenvm does not support: " + "; ".join(problems))


def check_runtime(scheduler, lenvm_model_config) -> None:
    """The same checks on what the scheduler built (a server started another way than ours);
    after init_memory_pools, which decides the pool kinds."""
    target = scheduler.tp_worker.model_runner
    tokenizer = getattr(scheduler, "tokenizer", None)
    problems = model_problems(target.model_config, lenvm_model_config.vocab_size,
                              len(tokenizer) if tokenizer is not None else None)
    if getattr(scheduler, "is_hybrid_swa", False) and not any("sliding" in p for p in problems):
        problems.append("a hybrid sliding-window KV pool")
    if getattr(scheduler, "is_hybrid_ssm", False) and not any("Mamba" in p for p in problems):
        problems.append("a hybrid state-space (Mamba) pool")
    if problems:
        raise ValueError("sglang-lenvm does not support: " + "; ".join(problems))


def _mambaish(model_config) -> bool:
    """A hybrid base whose layers keep recurrent state (Mamba, GDN, KDA, linear attention)."""
    from sglang.srt.configs.hybrid_arch import mambaish_config

    try:
        return mambaish_config(model_config) is not None
    except Exception:  # noqa: BLE001 - a config SGLang's helpers cannot read is not hybrid
        return False
