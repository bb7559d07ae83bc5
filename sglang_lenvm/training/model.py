"""The LenVM for training: a Hugging Face causal-LM backbone (without its LM head) + value head.

The value head (value_head.py) is the one the server runs, under the published layout's names
(`v_head.fc`, `v_head.summary`).

`num_layers` keeps only the first N decoder layers of the base (a shallower LenVM: each
scored token then costs N layers instead of all of them; issue #17's second lever).

The backbone can be split at layer k: layers below k frozen, layers k.. (and the final norm)
trained. The frozen part's output for a sequence never changes, so it can be computed once
and cached (`frozen_states`), which on a CPU makes each epoch cost only the trained layers.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from sglang_lenvm.value_head import ValueHead

logger = logging.getLogger(__name__)


def truncate_layers(backbone: nn.Module, num_layers: int) -> None:
    """Keep the first `num_layers` decoder layers (and the config that describes them)."""
    total = len(backbone.layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
    backbone.layers = nn.ModuleList(list(backbone.layers)[:num_layers])
    for k, v in layer_config_overrides(backbone.config, num_layers).items():
        setattr(backbone.config, k, v)


def layer_config_overrides(config, num_layers: int) -> dict:
    """config.json entries that change when only the first `num_layers` layers are kept."""
    out = {"num_hidden_layers": num_layers}
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):  # per-layer attention kinds (e.g. Qwen2)
        out["layer_types"] = list(layer_types)[:num_layers]
    return out


class LenVMForTraining(nn.Module):
    def __init__(self, backbone: nn.Module, train_last_layers: Optional[int] = None):
        super().__init__()
        self.backbone = backbone  # e.g. LlamaModel: embed_tokens, layers, norm, rotary_emb
        self.v_head = ValueHead(backbone.config.hidden_size)
        n_layers = len(backbone.layers)
        if train_last_layers is None or train_last_layers >= n_layers:
            self.split = 0  # full fine-tuning
        else:
            if train_last_layers < 0:
                raise ValueError("train_last_layers must be >= 0")
            self.split = n_layers - train_last_layers
            for p in backbone.embed_tokens.parameters():
                p.requires_grad_(False)
            for layer in backbone.layers[: self.split]:
                for p in layer.parameters():
                    p.requires_grad_(False)

    @classmethod
    def from_base(cls, base_path: str, train_last_layers: Optional[int] = None,
                  dtype: torch.dtype = torch.float32,
                  num_layers: Optional[int] = None) -> "LenVMForTraining":
        from transformers import AutoModel

        # AutoModel on a causal-LM checkpoint gives the bare backbone (no LM head, which a
        # LenVM does not need and which is large for big vocabularies). sdpa attention: with
        # no padding mask it runs causally.
        backbone = AutoModel.from_pretrained(base_path, dtype=dtype, attn_implementation="sdpa")
        if num_layers is not None:
            truncate_layers(backbone, num_layers)
        return cls(backbone, train_last_layers)

    @property
    def frozen(self) -> bool:
        return self.split > 0

    def _mask_and_rope(self, hidden: torch.Tensor):
        from transformers.masking_utils import create_causal_mask

        T = hidden.shape[1]
        pos = torch.arange(T, device=hidden.device).unsqueeze(0)
        # The model's own mask builder: None (causal sdpa) or an explicit causal mask.
        mask = create_causal_mask(config=self.backbone.config, inputs_embeds=hidden,
                                  attention_mask=None, past_key_values=None, position_ids=pos)
        return mask, pos, self.backbone.rotary_emb(hidden, position_ids=pos)

    def _layers(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        mask, pos, rope = self._mask_and_rope(hidden)
        for layer in self.backbone.layers[start:end]:
            out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def frozen_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Output of the frozen layers (the input of the first trained layer). [B, T, H]"""
        hidden = self.backbone.embed_tokens(input_ids)
        return self._layers(hidden, 0, self.split)

    def forward_from_states(self, states: torch.Tensor) -> torch.Tensor:
        """Trained layers + final norm + head on frozen-part outputs. -> z [B, T]"""
        hidden = self._layers(states, self.split, len(self.backbone.layers))
        return self.v_head(self.backbone.norm(hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """z [B, T] for right-padded input_ids (positions after a sequence's end are junk)."""
        if self.frozen:
            return self.forward_from_states(self.frozen_states(input_ids))
        hidden = self.backbone.embed_tokens(input_ids)
        return self.v_head(self.backbone.norm(self._layers(hidden, 0, len(self.backbone.layers))))

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors training changes, under checkpoint names (`model.*`, `v_head.*`)."""
        out = {}
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                out["model." + name] = p.detach()
        for name, p in self.v_head.named_parameters():
            out["v_head." + name] = p.detach()
        return out

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {"model." + k: v for k, v in self.backbone.state_dict().items()
                if not k.startswith("rotary_emb")}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {"v_head." + k: v for k, v in self.v_head.state_dict().items()}
