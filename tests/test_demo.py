"""The embedded demo pair: materialized from the GGUF + shipped assets into a fresh cache.

Slower than the other unit tests (GGUF dequantization and two ~540 MB checkpoints, about a
minute on a 2-core CPU) but kept in the default run: it is what `launch_server` with no
model arguments serves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sglang_lenvm import demo


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lenvm_cache")
    t0 = time.time()
    base, lenvm = demo.materialize_demo(str(cache))
    return Path(base), Path(lenvm), cache, time.time() - t0


@pytest.mark.timeout(900)
def test_materialized_dirs_are_loadable(pair):
    from sglang_lenvm.checkpoint import check_same_tokenizer, inspect_checkpoint

    base, lenvm, cache, _ = pair
    assert base.parent == cache and lenvm.parent == cache
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    ckpt = inspect_checkpoint(str(lenvm))
    meta = demo.asset_meta()
    assert ckpt.lenvm_architecture == "LlamaForLengthValue"
    assert ckpt.gamma == pytest.approx(meta["gamma"])
    assert ckpt.head_source == "value_head.safetensors"
    check_same_tokenizer(str(base), str(lenvm))
    assert (base / "chat_template.jinja").read_bytes() == (lenvm / "chat_template.jinja").read_bytes()
    # the one-pass candidate head ships with the demo, and the demo's trunk is the base's
    from sglang_lenvm.checkpoint import load_candidate_head_tensors, shared_trunk_layers

    shipped = demo.ASSETS_DIR / demo.ASSET_CANDIDATE_HEAD
    assert (lenvm / demo.ASSET_CANDIDATE_HEAD).read_bytes() == shipped.read_bytes()
    assert load_candidate_head_tensors(str(lenvm), ckpt.hidden_size) is not None
    assert shared_trunk_layers(str(base), str(lenvm)) == 28


@pytest.mark.timeout(900)
def test_rebuild_reproduces_the_trained_lenvm(pair):
    """A fresh rebuild gives the value recorded when the assets were made."""
    _, lenvm, _, _ = pair
    check = demo.asset_meta().get("check")
    if check is None:
        pytest.fail("demo assets have no recorded check value (run python -m sglang_lenvm.demo --record)")
    p = demo.boundary_value(lenvm, check["messages"])
    assert p == pytest.approx(check["p"], abs=1e-5)


def test_second_call_is_fast_and_same(pair):
    base, lenvm, cache, first_s = pair
    t0 = time.time()
    again = demo.materialize_demo(str(cache))
    assert again == (str(base), str(lenvm))
    assert time.time() - t0 < 5.0, "a materialized pair must be reused, not rebuilt"


def test_shipped_assets_are_small():
    total = sum(f.stat().st_size for f in demo.ASSETS_DIR.iterdir() if f.is_file())
    assert total <= 20 * 1024 * 1024
    meta = demo.asset_meta()
    assert meta["bytes"] == (demo.ASSETS_DIR / demo.ASSET_WEIGHTS).stat().st_size
