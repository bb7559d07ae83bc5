"""LenVM checkpoints in the published layout: detection and validation, without loading weights.

A LenVM checkpoint is a plain backbone checkpoint (`config.json` names the ordinary causal-LM
architecture, e.g. `Qwen2ForCausalLM`) plus the value head, either in `value_head.safetensors`
beside it or as `v_head.*` tensors inside the model shards. The head is
`v_head.fc` (Linear H->H, bias) -> SiLU -> `v_head.summary` (Linear H->1, bias).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

HEAD_FILE = "value_head.safetensors"
HEAD_PREFIX = "v_head."
# Optional: the one-pass candidate head (value_head.CandidateHead), beside the value head.
CANDIDATE_HEAD_FILE = "candidate_head.safetensors"
CANDIDATE_HEAD_PREFIX = "c_head."
# Causal-LM architecture in config.json -> our SGLang model class for it.
LENVM_ARCHITECTURES = {
    "Qwen2ForCausalLM": "Qwen2ForLengthValue",
    "Qwen3ForCausalLM": "Qwen3ForLengthValue",
    "LlamaForCausalLM": "LlamaForLengthValue",
}


class LenVMCheckpointError(ValueError):
    """A LenVM checkpoint directory that cannot be served, with the reason."""


@dataclasses.dataclass(frozen=True)
class LenVMCheckpoint:
    path: str
    architecture: str  # as in config.json
    lenvm_architecture: str  # our SGLang class
    hidden_size: int
    head_source: str  # HEAD_FILE, or the shard file that holds v_head.*
    gamma: Optional[float]  # `lenvm_gamma` from config.json, if recorded


def expected_head_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "v_head.fc.weight": (hidden, hidden),
        "v_head.fc.bias": (hidden,),
        "v_head.summary.weight": (1, hidden),
        "v_head.summary.bias": (1,),
    }


def check_head_shapes(shapes: dict[str, tuple[int, ...]], hidden: int, where: str) -> None:
    expected = expected_head_shapes(hidden)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise LenVMCheckpointError(f"value head in {where} is missing {missing}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise LenVMCheckpointError(f"value head in {where} has unexpected tensors {extra}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise LenVMCheckpointError(
                f"value head tensor {name} in {where} has shape {tuple(shapes[name])}, "
                f"expected {shape} for hidden_size={hidden}"
            )


def _safetensors_shapes(path: Path, prefix: str = "") -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}


def inspect_checkpoint(path: str) -> LenVMCheckpoint:
    """Validate a LenVM directory (config, architecture, head placement and shapes)."""
    root = Path(path)
    if not root.is_dir():
        raise LenVMCheckpointError(f"LenVM path {path!r} is not a directory")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise LenVMCheckpointError(f"LenVM path {path!r} has no config.json")
    cfg = json.loads(cfg_path.read_text())
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in LENVM_ARCHITECTURES.values():  # already names our class (e.g. an override)
        arch = {v: k for k, v in LENVM_ARCHITECTURES.items()}[arch]
    if arch not in LENVM_ARCHITECTURES:
        raise LenVMCheckpointError(
            f"LenVM backbone architecture {archs!r} in {cfg_path} is not supported; "
            f"supported: {sorted(LENVM_ARCHITECTURES)}"
        )
    hidden = cfg.get("hidden_size") or (cfg.get("text_config") or {}).get("hidden_size")
    if not isinstance(hidden, int):
        raise LenVMCheckpointError(f"{cfg_path} has no integer hidden_size")

    head_file = root / HEAD_FILE
    if head_file.is_file():
        shapes, source = _safetensors_shapes(head_file), HEAD_FILE
    else:
        shapes, source = {}, None
        for shard in sorted(root.glob("*.safetensors")):
            found = _safetensors_shapes(shard, HEAD_PREFIX)
            if found:
                shapes.update(found)
                source = shard.name
        if source is None:
            raise LenVMCheckpointError(
                f"no value head found in LenVM path {path!r}: expected {HEAD_FILE} beside the "
                f"backbone, or {HEAD_PREFIX}* tensors inside its safetensors shards. "
                f"Is this a plain language model rather than a LenVM?"
            )
    check_head_shapes(shapes, hidden, f"{path}/{source}")

    gamma = cfg.get("lenvm_gamma")
    if gamma is not None and not (isinstance(gamma, (int, float)) and 0 < gamma < 1
                                  and math.isfinite(gamma)):
        raise LenVMCheckpointError(f"lenvm_gamma in {cfg_path} must be in (0, 1), got {gamma!r}")
    return LenVMCheckpoint(
        path=str(root),
        architecture=arch,
        lenvm_architecture=LENVM_ARCHITECTURES[arch],
        hidden_size=hidden,
        head_source=source,
        gamma=float(gamma) if gamma is not None else None,
    )


def load_head_tensors(path: str) -> dict:
    """The v_head.* tensors of a checkpoint (from value_head.safetensors or the shards)."""
    from safetensors import safe_open

    root = Path(path)
    files = [root / HEAD_FILE] if (root / HEAD_FILE).is_file() else sorted(root.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                if k.startswith(HEAD_PREFIX):
                    out[k] = f.get_tensor(k)
    return out


def expected_candidate_head_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "c_head.state.weight": (hidden, hidden),
        "c_head.state.bias": (hidden,),
        "c_head.token.weight": (hidden, hidden),
        "c_head.summary.weight": (1, hidden),
        "c_head.summary.bias": (1,),
    }


def load_candidate_head_tensors(path: str, hidden: int) -> Optional[dict]:
    """The c_head.* tensors of `candidate_head.safetensors`, checked; None if there is none."""
    from safetensors.torch import load_file

    file = Path(path) / CANDIDATE_HEAD_FILE
    if not file.is_file():
        return None
    tensors = load_file(str(file))
    expected = expected_candidate_head_shapes(hidden)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise LenVMCheckpointError(
            f"{file} holds {sorted(got.items())}, expected {sorted(expected.items())} for "
            f"hidden_size={hidden}")
    return tensors


def tokenizer_fingerprint(path: str) -> dict:
    """What must agree between base model and LenVM: the token -> id map and the EOS id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return {"vocab": tok.get_vocab(), "eos_token_id": tok.eos_token_id}


def check_same_tokenizer(base_path: str, lenvm_path: str) -> None:
    base = tokenizer_fingerprint(base_path)
    lenvm = tokenizer_fingerprint(lenvm_path)
    if base["vocab"] != lenvm["vocab"]:
        only_base = len(set(base["vocab"].items()) - set(lenvm["vocab"].items()))
        raise LenVMCheckpointError(
            f"the LenVM at {lenvm_path!r} does not share the base model's tokenizer "
            f"({len(base['vocab'])} vs {len(lenvm['vocab'])} tokens, {only_base} token ids differ); "
            f"a LenVM must be trained on the base model's tokenizer"
        )


def _tensor_files(path: str) -> dict:
    """tensor name -> safetensors file of a checkpoint directory (value/candidate heads
    excluded)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        if file.name in (HEAD_FILE, CANDIDATE_HEAD_FILE):
            continue
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                out[k] = file
    return out


def shared_trunk_layers(base_path: str, lenvm_path: str) -> int:
    """How many leading decoder layers the LenVM shares with the base model, bit for bit
    (a LenVM trained with --train-last-layers N from its base shares all but the last N):
    the LenVM then reads the base model's residual stream at that layer instead of computing
    those layers again. 0 unless the architectures and configs agree and the embeddings are
    equal."""
    import torch
    from safetensors import safe_open

    def config(p):
        cfg = json.loads((Path(p) / "config.json").read_text())
        return {k: cfg.get(k) for k in ("architectures", "hidden_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads",
                                        "intermediate_size", "rope_theta", "rms_norm_eps",
                                        "head_dim", "vocab_size")}

    if not (Path(base_path) / "config.json").is_file() or config(base_path) != config(lenvm_path):
        return 0
    base, lenvm = _tensor_files(base_path), _tensor_files(lenvm_path)

    def same(names) -> bool:
        for name in names:
            if name not in base or name not in lenvm:
                return False
            with safe_open(str(base[name]), framework="pt") as f:
                a = f.get_tensor(name)
            with safe_open(str(lenvm[name]), framework="pt") as f:
                b = f.get_tensor(name)
            if a.shape != b.shape or not torch.equal(a.to(b.dtype), b):
                return False
        return True

    if not same(["model.embed_tokens.weight"]):
        return 0
    n_layers = int(config(lenvm_path)["num_hidden_layers"])
    shared = 0
    for i in range(n_layers - 1):  # the last layer is never shared: the LenVM must run one
        prefix = f"model.layers.{i}."
        names = [k for k in lenvm if k.startswith(prefix)]
        if not names or not same(names):
            break
        shared += 1
    return shared
