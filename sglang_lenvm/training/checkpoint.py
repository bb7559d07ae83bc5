"""Writing LenVM checkpoints in the published layout (what `--lenvm-path` loads).

  config.json              the backbone's own config (its causal-LM architecture) + lenvm_gamma
  model.safetensors        backbone tensors under the causal LM's names (`model.*`)
  value_head.safetensors   v_head.fc.{weight,bias}, v_head.summary.{weight,bias} (float32)
  tokenizer files          copied verbatim from the base, so base and LenVM share the tokenizer
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from sglang_lenvm.checkpoint import HEAD_FILE

# Files of a model directory that are not tokenizer/template files.
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template and generation config, byte for byte."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_NOT_TOKENIZER) and f.name != "config.json" \
                and not f.name.endswith(".index.json") and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)


def base_files_dir(base: str) -> Path:
    """A local directory holding the base checkpoint's config and tokenizer files."""
    p = Path(base)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download  # a hub id: its small files only

    return Path(snapshot_download(base, allow_patterns=["*.json", "*.jinja", "*.txt",
                                                        "*.model", "*.tiktoken"]))


def save_backbone_and_head(out_dir, backbone: dict[str, torch.Tensor],
                           head: dict[str, torch.Tensor], *, config_src, gamma: float,
                           dtype: Optional[torch.dtype] = None,
                           extra_config: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(config_src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["lenvm_gamma"] = float(gamma)
    if dtype is not None:
        cfg["dtype"] = cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    if extra_config:
        cfg.update(extra_config)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               .detach().cpu().contiguous() for k, v in backbone.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    # The head stays float32 whatever the backbone dtype: the server runs it in float32, and
    # p near 1 is where the length inversion is most sensitive to rounding.
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()},
              str(out / HEAD_FILE), metadata={"format": "pt"})
    copy_tokenizer_files(src, out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
