"""LenVM model classes for SGLang: a causal-LM backbone plus the 2-layer value head
(value_head.py, float32), which reads the final-norm hidden state of every token.

Weights load strictly from the published layout (see `checkpoint.py`): every backbone parameter
and the four head tensors must be found with the right shapes, or loading fails with a message.
"""

from __future__ import annotations

import logging
from typing import Iterable, Tuple

import torch
from torch import nn

from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.models.llama import LlamaModel
from sglang.srt.models.qwen2 import Qwen2Model
from sglang.srt.models.qwen3 import Qwen3Model
from sglang.srt.utils import add_prefix

from sglang_lenvm.checkpoint import (
    CANDIDATE_HEAD_PREFIX,
    HEAD_PREFIX,
    LenVMCheckpointError,
    check_head_shapes,
    load_head_tensors,
)
from sglang_lenvm.value_head import ValueHead

logger = logging.getLogger(__name__)

# HF checkpoint names -> SGLang's fused parameters.
_STACKED = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class _LengthValueModel(nn.Module):
    backbone_cls: type = None

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        if quant_config is not None:
            raise LenVMCheckpointError("quantized LenVM checkpoints are not supported")
        self.config = config
        self.model = self.backbone_cls(config, quant_config=None, prefix=add_prefix("model", prefix))
        self.v_head = ValueHead(config.hidden_size)

    def hidden_states(self, input_ids, positions, forward_batch: ForwardBatch,
                      input_embeds=None) -> torch.Tensor:
        """Final-norm hidden states; `input_embeds` replaces the token embeddings (with a
        shared trunk: the base model's residual stream at the backbone's start_layer)."""
        out = self.model(input_ids, positions, forward_batch, input_embeds=input_embeds)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                forward_batch: ForwardBatch, input_embeds=None, **_) -> torch.Tensor:
        """Raw values z [N] for every token of the batch (after writing their KV)."""
        return self.v_head(self.hidden_states(input_ids, positions, forward_batch))

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        backbone_names = {n for n in params if not n.startswith(HEAD_PREFIX)}
        loaded: set[str] = set()
        head: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            if name.startswith(HEAD_PREFIX):
                head[name] = tensor
                continue
            if name.startswith(CANDIDATE_HEAD_PREFIX):
                continue  # candidate_head.safetensors: the worker loads it (one-pass scoring)
            if name.startswith("lm_head.") or name.endswith(_IGNORED_SUFFIXES):
                continue  # a LenVM has no LM head; tied or not, it is unused
            for fused, part, shard in _STACKED:
                if part in name:
                    target = name.replace(part, fused)
                    if target not in params:
                        break
                    params[target].weight_loader(params[target], tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise LenVMCheckpointError(
                        f"unexpected tensor {name!r} in LenVM checkpoint "
                        f"{self.config._name_or_path!r} (not a {type(self.model).__name__} weight)"
                    )
                param = params[name]
                if tuple(param.shape) != tuple(tensor.shape) and not hasattr(param, "weight_loader"):
                    raise LenVMCheckpointError(f"{name}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)

        missing = sorted(backbone_names - loaded)
        if missing:
            raise LenVMCheckpointError(
                f"LenVM checkpoint {self.config._name_or_path!r} is missing backbone weights "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        if not head:  # indexed shards skip value_head.safetensors: read it ourselves
            head = load_head_tensors(self.config._name_or_path)
        if not head:
            raise LenVMCheckpointError(
                f"no value head found for LenVM {self.config._name_or_path!r}: expected "
                f"value_head.safetensors beside the backbone or v_head.* tensors in its shards"
            )
        check_head_shapes({k: tuple(v.shape) for k, v in head.items()}, self.config.hidden_size,
                          str(self.config._name_or_path))
        for name, tensor in head.items():
            params[name].data.copy_(tensor.to(torch.float32))
        logger.info("Loaded LenVM %s (value head: %d tensors)", self.config._name_or_path, len(head))


class Qwen2ForLengthValue(_LengthValueModel):
    backbone_cls = Qwen2Model


class Qwen3ForLengthValue(_LengthValueModel):
    backbone_cls = Qwen3Model


class LlamaForLengthValue(_LengthValueModel):
    backbone_cls = LlamaModel


EntryClass = [Qwen2ForLengthValue, Qwen3ForLengthValue, LlamaForLengthValue]
