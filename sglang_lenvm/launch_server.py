"""`python -m sglang_lenvm.launch_server`: SGLang's server with a co-located LenVM.

Takes every `sglang.launch_server` argument plus our `--lenvm-*` flags (`_our_parser` below is
their one description; `--help` prints it, then SGLang's).
Without --model-path (and --lenvm-path) it serves the embedded demo pair.
On a machine without a GPU it adds CPU defaults (--device cpu, float32, a bounded KV cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from sglang_lenvm.config import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_STAR_TOKENS,
    DEFAULT_AT_LEAST_END_PULL,
    DEFAULT_AT_MOST_END_BOOST,
    DEFAULT_AT_MOST_SOFTNESS,
    DEFAULT_EQUAL_DISTANCE,
    DEFAULT_EQUAL_MAX_OVERSHOOT,
    DEFAULT_EQUAL_SOFTNESS,
    DEFAULT_EQUAL_UNDERSHOOT,
    DEFAULT_PLAUSIBILITY,
    DEFAULT_REPEAT_LIMIT,
    DEFAULT_REPEAT_NGRAM,
    DEFAULT_GAMMA,
    DEFAULT_SCORING,
    DEFAULT_SENTENCE_END,
    DEFAULT_TOP_K,
    EQUAL_DISTANCES,
    SCORINGS,
    SENTENCE_ENDS,
    LenVMConfig,
    resolve_gamma,
)

logger = logging.getLogger(__name__)

# KV slots when none are given on a CPU: base + LenVM KV of the demo pair (SmolLM2-135M, fp32)
# is ~92 KB per slot, so 16384 slots take ~1.5 GB of host memory.
CPU_MAX_TOTAL_TOKENS = 16384


def _our_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("LenVM (sglang-lenvm)")
    g.add_argument("--lenvm-path", default=None, help="LenVM checkpoint directory")
    g.add_argument("--lenvm-gamma", type=float, default=None,
                   help=f"discount factor (default: lenvm_gamma in the checkpoint, else {DEFAULT_GAMMA})")
    g.add_argument("--lenvm-top-k", type=int, default=DEFAULT_TOP_K,
                   help="candidates per step for guided requests without their own top_k")
    g.add_argument("--lenvm-equal-distance", choices=EQUAL_DISTANCES,
                   default=DEFAULT_EQUAL_DISTANCE,
                   help="length_mode=equal picks the candidate whose predicted remaining length "
                        "l is closest to the budget r: 'ratio' compares ln(1+l) with ln(1+r), "
                        "'tokens' compares l with r (the paper's rule)")
    g.add_argument("--lenvm-plausibility", type=float, default=DEFAULT_PLAUSIBILITY,
                   metavar="ALPHA",
                   help="only candidates with base probability >= ALPHA x the most likely "
                        "candidate's compete on length (the most likely and stop tokens "
                        "always do); 0: every top-k candidate")
    g.add_argument("--lenvm-equal-softness", type=float, default=DEFAULT_EQUAL_SOFTNESS,
                   metavar="LAMBDA",
                   help="length_mode=equal samples q(x) ~ p(x) exp(-LAMBDA d(x)), d the "
                        "distance of x's predicted length to the budget ('inf': the closest "
                        "candidate, deterministically)")
    g.add_argument("--lenvm-at-least-end-pull", type=float, default=DEFAULT_AT_LEAST_END_PULL,
                   metavar="MU",
                   help="once a length_mode=at_least output has its target, q(x) ~ p(x) "
                        "(1 + l(x))^-MU: a pull toward ending (0: none)")
    g.add_argument("--lenvm-at-most-softness", type=float, default=DEFAULT_AT_MOST_SOFTNESS,
                   metavar="LAMBDA",
                   help="while a length_mode=at_most output has budget left, q(x) ~ p(x) "
                        "exp(-LAMBDA d(x)), d(x) = max(0, ln(1+l(x)) - ln(1+r)) how far x's "
                        "predicted length runs past the budget ('inf': only candidates "
                        "predicted to fit, else the shortest); the last token is always a stop "
                        "token")
    g.add_argument("--lenvm-equal-undershoot", type=float, default=DEFAULT_EQUAL_UNDERSHOOT,
                   metavar="U",
                   help="length_mode=equal: a candidate predicted to end short of the target "
                        "counts U times its distance (1: symmetric)")
    g.add_argument("--lenvm-at-most-end-boost", type=float, default=DEFAULT_AT_MOST_END_BOOST,
                   metavar="B",
                   help="right after a sentence end, a length_mode=at_most output's stop token "
                        "weighs B x its base probability (1: as is; needs --lenvm-sentence-end "
                        "on)")
    g.add_argument("--lenvm-repeat-ngram", type=int, default=DEFAULT_REPEAT_NGRAM, metavar="N",
                   help="guided requests may not write a token n-gram of N tokens more than "
                        "--lenvm-repeat-limit times: the tokens that would are removed from "
                        "the candidates (loops of a model kept writing); 0: no guard")
    g.add_argument("--lenvm-repeat-limit", type=int, default=DEFAULT_REPEAT_LIMIT, metavar="C",
                   help="how many times one n-gram of --lenvm-repeat-ngram tokens may occur in "
                        "a guided output")
    g.add_argument("--lenvm-sentence-end", choices=SENTENCE_ENDS, default=DEFAULT_SENTENCE_END,
                   help="equal and at_most: a candidate that ends a sentence counts as at most "
                        "1 token from the end, and an equal output (or an at_least one past "
                        "its target) may stop right after one, "
                        "so outputs end at sentence ends near their target ('off': the "
                        "LenVM's predicted lengths only)")
    g.add_argument("--lenvm-max-star-tokens", type=int, default=DEFAULT_MAX_STAR_TOKENS,
                   metavar="N",
                   help="tokens one LenVM star forward may hold (each guided request's root "
                        "and candidates); a step with more runs several forwards. Bounds the "
                        "scorer's workspace, which is charged to the KV cache budget at start")
    g.add_argument("--lenvm-equal-max-overshoot", type=float, default=DEFAULT_EQUAL_MAX_OVERSHOOT,
                   metavar="F",
                   help="once a length_mode=equal output is F x its target past the target, "
                        "its stop token joins the candidates (and wins): it ends by "
                        "(1 + F) x target tokens even when degenerate text keeps the stop token "
                        "out of the top-k ('inf': never)")
    g.add_argument("--lenvm-scoring", choices=SCORINGS, default=DEFAULT_SCORING,
                   help="how candidates are scored: 'star' runs the LenVM over every "
                        "candidate (1 + K tokens per request per step), 'one-pass' over the "
                        "state only, with the checkpoint's candidate head "
                        "(candidate_head.safetensors); 'auto': one-pass when the checkpoint "
                        "has that head")
    g.add_argument("--lenvm-shared-trunk", choices=("auto", "off"), default="auto",
                   help="with one-pass scoring: when the LenVM's leading layers are the base "
                        "model's own (a LenVM trained with --train-last-layers), run only the "
                        "rest, from the base model's residual stream (auto), or run them all "
                        "(off)")
    g.add_argument("--lenvm-max-n", type=int, default=DEFAULT_MAX_N, metavar="N",
                   help="most samples (n, best_of) one request may ask for, on every route, "
                        "guided or not: SGLang runs n samples at once, so an unbounded n lets "
                        "one request occupy the server")
    return p


def _has_flag(argv: List[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _flag_value(argv: List[str], flag: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _int_flag(argv: List[str], *names: str) -> int:
    for name in names:
        value = _flag_value(argv, name)
        if value is not None and value.isdigit():
            return int(value)
    return 1


def cpu_groups(cores: List[int], ranks: int) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for `ranks` ranks: contiguous groups of the cores
    ("0|1" for 2 ranks on 2 cores); with fewer cores than ranks, ranks share cores."""
    if len(cores) < ranks:
        return "|".join(str(cores[i % len(cores)]) for i in range(ranks))
    size = len(cores) // ranks
    return "|".join(",".join(map(str, cores[i * size:(i + 1) * size])) for i in range(ranks))


def cpu_defaults(argv: List[str]) -> List[str]:
    """SGLang on a CPU-only machine: torch_native attention, float32, a bounded KV cache, and
    an idle scheduler that sleeps."""
    import torch

    if torch.cuda.is_available():
        return argv
    extra = []
    if not _has_flag(argv, "--device"):
        extra += ["--device", "cpu"]
    if not _has_flag(argv, "--dtype"):
        extra += ["--dtype", "float32"]
    if not _has_flag(argv, "--max-total-tokens") and not _has_flag(argv, "--mem-fraction-static"):
        # Unbounded, SGLang sizes the KV cache from free host memory (15 GB for a tiny model).
        extra += ["--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS)]
    ranks = _int_flag(argv, "--tp-size", "--tp") * _int_flag(argv, "--dp-size", "--dp")
    if ranks > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ:
        # SGLang binds each CPU rank to a NUMA node and refuses more ranks than nodes unless
        # this says which cores each rank uses. Split this process's cores among the ranks.
        os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_groups(sorted(os.sched_getaffinity(0)),
                                                               ranks)
    if not _has_flag(argv, "--sleep-on-idle"):
        # Idle, SGLang's scheduler polls its sockets without blocking: one core at 100%, taken
        # from the OpenMP threads of everything else on a small CPU. With this flag it blocks
        # in zmq's poll until a message arrives (upstream's IdleSleeper), so a request still
        # wakes it at once.
        extra += ["--sleep-on-idle"]
    return argv + extra


def make_config(lenvm_path: str, base_path: Optional[str], *, gamma: Optional[float] = None,
                shared_trunk: str = "auto", base_model_path: Optional[str] = None,
                **settings) -> LenVMConfig:
    """Validate a LenVM checkpoint (and its tokenizer against the base's) into a config;
    `settings` are LenVMConfig fields."""
    from sglang_lenvm.checkpoint import (
        check_same_tokenizer,
        inspect_checkpoint,
        load_candidate_head_tensors,
        shared_trunk_layers,
    )

    ckpt = inspect_checkpoint(lenvm_path)
    if base_path is not None:
        check_same_tokenizer(base_path, lenvm_path)
    config = LenVMConfig(lenvm_path=os.path.abspath(lenvm_path),
                         gamma=resolve_gamma(gamma, ckpt.gamma), **settings)
    # A missing or misshapen candidate head is refused here, before anything loads.
    scoring = config.resolved_scoring(load_candidate_head_tensors(lenvm_path, ckpt.hidden_size)
                                      is not None)
    base_model_path = base_model_path or base_path
    if scoring == "one-pass" and shared_trunk == "auto" and base_model_path is not None:
        trunk = shared_trunk_layers(base_model_path, lenvm_path)
        if trunk:
            config = dataclasses.replace(config, trunk_layers=trunk)
    return config


def prepare(argv: List[str]):
    """Parse our flags, validate the LenVM, publish the config; returns SGLang's args list."""
    ours, rest = _our_parser().parse_known_args(argv)
    if not _has_flag(rest, "--model-path") and ours.lenvm_path is None:
        from sglang_lenvm.demo import materialize_demo

        base, lenvm = materialize_demo()
        rest = ["--model-path", base] + rest
        ours.lenvm_path = lenvm
    rest = cpu_defaults(rest)
    config = None
    if ours.lenvm_path is not None:
        base = _flag_value(rest, "--tokenizer-path") or _flag_value(rest, "--model-path")
        config = make_config(ours.lenvm_path, base, gamma=ours.lenvm_gamma,
                             top_k=ours.lenvm_top_k, equal_distance=ours.lenvm_equal_distance,
                             equal_max_overshoot=ours.lenvm_equal_max_overshoot,
                             plausibility=ours.lenvm_plausibility,
                             equal_softness=ours.lenvm_equal_softness,
                             at_least_end_pull=ours.lenvm_at_least_end_pull,
                             at_most_softness=ours.lenvm_at_most_softness,
                             at_most_end_boost=ours.lenvm_at_most_end_boost,
                             equal_undershoot=ours.lenvm_equal_undershoot,
                             repeat_ngram=ours.lenvm_repeat_ngram,
                             repeat_limit=ours.lenvm_repeat_limit,
                             sentence_end=ours.lenvm_sentence_end,
                             max_star_tokens=ours.lenvm_max_star_tokens,
                             scoring=ours.lenvm_scoring,
                             shared_trunk=ours.lenvm_shared_trunk,
                             base_model_path=_flag_value(rest, "--model-path"))
        config.to_env()
    else:
        os.environ.pop("SGLANG_LENVM_CONFIG", None)
    return config, rest


def check_setup(server_args, config: LenVMConfig) -> None:
    """Everything the LenVM cannot serve, refused before any weights load (ValueError)."""
    from sglang.srt.configs.model_config import ModelConfig

    from sglang_lenvm.runtime.compat import check_models, check_server_args
    from sglang_lenvm.runtime.hooks import missing_hooks

    missing = missing_hooks()
    if missing:
        raise ValueError("these SGLang hook points did not take our hooks (is SGLang "
                         "0.5.23 installed?): " + ", ".join(missing))
    check_server_args(server_args)
    base = ModelConfig.from_server_args(server_args)
    lenvm = json.loads((Path(config.lenvm_path) / "config.json").read_text())
    check_models(base, _vocab_size(lenvm), _tokenizer_size(server_args))


def _vocab_size(cfg: dict) -> Optional[int]:
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return v if isinstance(v, int) else None


def _tokenizer_size(server_args) -> Optional[int]:
    from transformers import AutoTokenizer

    path = server_args.tokenizer_path or server_args.model_path
    try:
        return len(AutoTokenizer.from_pretrained(path))
    except Exception:  # noqa: BLE001 - no tokenizer to read here: SGLang will say so itself
        return None


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _our_parser().print_help()
        print("\nAll other arguments are sglang.launch_server's:\n")
    from sglang_lenvm.checkpoint import LenVMCheckpointError

    try:
        config, rest = prepare(argv)
        max_n = _our_parser().parse_known_args(argv)[0].lenvm_max_n
        if max_n < 1:
            raise ValueError(f"--lenvm-max-n must be >= 1, got {max_n}")
    except (LenVMCheckpointError, ValueError) as e:
        sys.exit(f"sglang-lenvm: {e}")

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(rest)
    if config is not None:
        try:
            check_setup(server_args, config)
        except ValueError as e:
            sys.exit(f"sglang-lenvm: {e}")
    from sglang_lenvm import api

    api.install(config, max_n=max_n)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
