"""Shared fixtures: tiny models built on the fly, and real servers started once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

from sglang_lenvm.testing.server_process import Server  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny random checkpoints: a BPE pair (Qwen2 base + Llama LenVM, head in
    value_head.safetensors) and a character-vocabulary pair (Qwen2 base + Qwen3 oracle LenVM
    with its head inside the shards). LenVM and base only need to share the tokenizer: the BPE
    base pads its vocabulary with 8 rows past the tokenizer's, the LenVM does not."""
    from sglang_lenvm.testing import tiny_models as tm

    root = tmp_path_factory.mktemp("models")
    tm.build_tokenizer(root / "tok")
    tm.build_causal_lm(root / "base", root / "tok", seed=0, extra_vocab=8)
    tm.build_lenvm(root / "lenvm", root / "tok", head_placement="file", arch="llama", seed=3)
    tm.build_char_tokenizer(root / "ctok")
    tm.build_causal_lm(root / "cbase", root / "ctok", seed=5)
    tm.build_oracle_lenvm(root / "oracle", root / "ctok", gamma=0.9, head_placement="shards",
                          arch="qwen3")
    # The same LenVMs with a one-pass candidate head (tests/test_one_pass.py).
    tm.with_candidate_head(root / "lenvm", root / "lenvm_1p", tm.random_candidate_head(64))
    tm.with_candidate_head(root / "oracle", root / "oracle_1p",
                           tm.oracle_candidate_head(root / "oracle"))
    # A LenVM sharing its first layer with cbase (a shared trunk), with a candidate head.
    tm.build_trunk_lenvm(root / "trunk", root / "cbase")
    return root


@pytest.fixture(scope="session")
def server(models, tmp_path_factory):
    """Random base + random LenVM (published layout, head file), default settings, with fault
    injection on: only requests whose rid asks for a fault (tests/test_faults.py) see one,
    SGLang's Prometheus endpoint (tests/test_operations.py) and the host-sync guard
    (tests/test_sync_guard.py). Star forwards hold at most 66 tokens (the smallest bound the
    largest tree allows): a step with more than three default-top_k trees runs several."""
    from sglang_lenvm.runtime import sync_guard
    from sglang_lenvm.runtime.faults import ENV_VAR, PHASES

    s = Server(["--model-path", str(models / "base"), "--lenvm-path", str(models / "lenvm"),
                "--chunked-prefill-size", "64", "--enable-metrics",
                "--lenvm-max-star-tokens", "66"],
               tmp_path_factory.mktemp("logs") / "server.log",
               env={ENV_VAR: ",".join(PHASES), sync_guard.ENV_VAR: "1"})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def oracle_server(models, tmp_path_factory):
    """Char-vocabulary base + the oracle LenVM; every token is a candidate (top-k 48) and
    competes on length (--lenvm-plausibility 0: the random base model gives the one token with
    the exact remaining length less than 0.1 x its favourite's probability at times, and the
    default floor would rightly keep it out). The other rule knobs are the defaults (soft
    equal, at_least's end pull), so exactness is checked for the rule users get."""
    from sglang_lenvm.runtime import sync_guard

    s = Server(["--model-path", str(models / "cbase"), "--lenvm-path", str(models / "oracle"),
                "--lenvm-top-k", "48", "--lenvm-plausibility", "0"],
               tmp_path_factory.mktemp("logs") / "oracle.log", env={sync_guard.ENV_VAR: "1"})
    yield s
    s.stop()


# Test tiers: `pytest -m unit` (seconds: no models, no servers, no subprocesses), `-m server`
# (against real servers on the tiny models), `-m slow` (everything else that takes time:
# building models, training, Triton interpreter children, the Engine, the demo pair).
SERVER_FIXTURES = {"server", "oracle_server", "fault_server", "one_pass_server",
                   "oracle_one_pass_server", "trunk_server", "unguarded_server"}
SLOW_FIXTURES = {"models"}
SLOW_MODULES = {"test_engine", "test_demo", "test_train_e2e", "test_train", "test_startup",
                "test_kernel_bench_smoke", "test_kernel_compile", "test_generate_data"}
SLOW_TESTS = {"test_interpreter_subprocess", "test_help", "test_ranks_agree_on_tokens_and_faults"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        module = item.module.__name__.rsplit(".", 1)[-1]
        if fixtures & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)
        elif (fixtures & SLOW_FIXTURES or module in SLOW_MODULES
              or item.originalname in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
        else:
            item.add_marker(pytest.mark.unit)
