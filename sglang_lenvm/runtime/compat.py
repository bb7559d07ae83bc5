"""Server configurations the LenVM co-location supports, checked before anything is loaded.

Each refused option would break the invariant that the LenVM's KV cache mirrors the base
model's slot for slot (or runs a second model in ways not built here).
"""

from __future__ import annotations


def _get(args, name, default=None):
    return getattr(args, name, default)


def check_server_args(args) -> None:
    problems = []
    if _get(args, "speculative_algorithm"):
        problems.append("--speculative-algorithm (its draft slots would collide with the LenVM's)")
    for name, flag in (("tp_size", "--tp-size"), ("dp_size", "--dp-size"), ("pp_size", "--pp-size")):
        if (_get(args, name) or 1) > 1:
            problems.append(f"{flag} > 1 (the LenVM runs on a single device)")
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
    if problems:
        raise ValueError("sglang-lenvm does not support: " + "; ".join(problems))
