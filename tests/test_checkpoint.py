import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_lenvm.checkpoint import (
    LenVMCheckpointError,
    check_same_tokenizer,
    inspect_checkpoint,
)
from sglang_lenvm.testing import tiny_models as tm


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tm.build_tokenizer(d)
    return d


@pytest.mark.parametrize("placement", ["file", "shards"])
def test_head_detected_in_both_placements(tmp_path, tok, placement):
    tm.build_lenvm(tmp_path, tok, head_placement=placement)
    ck = inspect_checkpoint(str(tmp_path))
    assert ck.architecture == "Qwen2ForCausalLM"
    assert ck.lenvm_architecture == "Qwen2ForLengthValue"
    assert ck.head_source == ("value_head.safetensors" if placement == "file" else "model.safetensors")
    assert ck.gamma is None


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForLengthValue"), ("qwen3", "Qwen3ForLengthValue")])
def test_other_backbones(tmp_path, tok, arch, cls):
    tm.build_lenvm(tmp_path, tok, arch=arch, gamma=0.99)
    ck = inspect_checkpoint(str(tmp_path))
    assert ck.lenvm_architecture == cls and ck.gamma == 0.99


def test_plain_lm_is_refused(tmp_path, tok):
    tm.build_lenvm(tmp_path, tok, head_placement="none")
    with pytest.raises(LenVMCheckpointError, match="no value head"):
        inspect_checkpoint(str(tmp_path))


def test_head_shape_mismatch_is_refused(tmp_path, tok):
    tm.build_lenvm(tmp_path, tok, head_placement="file")
    head = load_file(str(tmp_path / "value_head.safetensors"))
    head["v_head.fc.weight"] = torch.zeros(32, 32)
    save_file(head, str(tmp_path / "value_head.safetensors"))
    with pytest.raises(LenVMCheckpointError, match=r"v_head.fc.weight .* shape \(32, 32\).*\(64, 64\)"):
        inspect_checkpoint(str(tmp_path))


def test_missing_head_tensor_is_refused(tmp_path, tok):
    tm.build_lenvm(tmp_path, tok, head_placement="file")
    head = load_file(str(tmp_path / "value_head.safetensors"))
    del head["v_head.summary.bias"]
    save_file(head, str(tmp_path / "value_head.safetensors"))
    with pytest.raises(LenVMCheckpointError, match="missing.*v_head.summary.bias"):
        inspect_checkpoint(str(tmp_path))


def test_bad_gamma_and_arch(tmp_path, tok):
    tm.build_lenvm(tmp_path, tok, gamma=1.5)
    with pytest.raises(LenVMCheckpointError, match="lenvm_gamma"):
        inspect_checkpoint(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg.pop("lenvm_gamma")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LenVMCheckpointError, match="not supported"):
        inspect_checkpoint(str(tmp_path))
    with pytest.raises(LenVMCheckpointError, match="not a directory"):
        inspect_checkpoint(str(tmp_path / "nope"))


def test_tokenizer_mismatch(tmp_path, tok):
    other = tmp_path / "ctok"
    tm.build_char_tokenizer(other)
    check_same_tokenizer(str(tok), str(tok))
    with pytest.raises(LenVMCheckpointError, match="does not share the base model's tokenizer"):
        check_same_tokenizer(str(tok), str(other))
