"""The training loop: shuffled batches, token-mean MSE, gradient accumulation, per-epoch eval."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from typing import Optional, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from sglang_lenvm.returns import remaining_from_p
from sglang_lenvm.training.data import Batch, Example, batches
from sglang_lenvm.training.model import LenVMForTraining
from sglang_lenvm.training.targets import (
    ground_truth_length,
    prompt_boundary_mre,
    squared_error_sum,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 4  # micro-batches per optimizer step
    lr: float = 1e-4  # backbone layers
    head_lr: float = 1e-3  # the freshly initialized value head learns faster
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    bf16: bool = False  # autocast the backbone in bfloat16 (weights and head stay float32)
    device: str = "cpu"
    seed: int = 0
    eval_batch_size: int = 16
    max_steps: Optional[int] = None  # stop early (smoke tests)
    progress: bool = True


class StateCache:
    """Frozen-part outputs per example, computed once (CPU memory, float32 or bfloat16)."""

    def __init__(self, model: LenVMForTraining, examples: Sequence[Example], cfg: TrainConfig,
                 desc: str):
        from tqdm import tqdm

        store = torch.bfloat16 if cfg.bf16 else torch.float32
        self.states: list[Optional[torch.Tensor]] = [None] * len(examples)
        # Length-sorted batches waste little compute on padding.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        bs = cfg.eval_batch_size
        with tqdm(total=len(order), desc=desc, unit="seq", disable=not cfg.progress) as bar:
            for k in range(0, len(order), bs):
                idx = order[k: k + bs]
                ids = pad_sequence([torch.tensor(examples[i].input_ids) for i in idx],
                                   batch_first=True)
                with _autocast(cfg):
                    h = model.frozen_states(ids.to(cfg.device))
                for row, i in enumerate(idx):
                    self.states[i] = h[row, : len(examples[i].input_ids)].to("cpu", store)
                bar.update(len(idx))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return pad_sequence([self.states[i] for i in indices], batch_first=True)


def _autocast(cfg: TrainConfig):
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16,
                          enabled=cfg.bf16)


def values(model: LenVMForTraining, batch: Batch, cfg: TrainConfig,
           cache: Optional[StateCache]) -> torch.Tensor:
    """z [B, T] for a batch, from cached frozen states when available."""
    with _autocast(cfg):
        if cache is not None:
            return model.forward_from_states(cache.batch(batch.indices).to(cfg.device))
        return model(batch.input_ids.to(cfg.device))


@torch.no_grad()
def evaluate(model: LenVMForTraining, examples: Sequence[Example], gamma: float,
             cfg: TrainConfig, cache: Optional[StateCache] = None,
             mre_lengths: Optional[dict[str, list[int]]] = None) -> dict:
    """Token-mean validation loss, and the prompt-boundary MRE (paper eq. 13-15).

    `mre_lengths` (prompt_id -> sample lengths) lets L_GT use more samples than are run
    through the model: the MRE needs only each prompt's s_0 value, so the loss can be
    measured on a subset of the completions while L_GT uses all of them."""
    model.eval()
    sse, n_tok = 0.0, 0
    boundary: dict[str, float] = {}  # prompt_id -> predicted length at s_0
    lengths: dict[str, list[int]] = {}
    for b in batches(examples, cfg.eval_batch_size, gamma, shuffle=False):
        z = values(model, b, cfg, cache)
        mask, tgt = b.mask.to(z.device), b.targets.to(z.device)
        sse += float(squared_error_sum(z, tgt, mask, b.censored.to(z.device)))
        n_tok += int(mask.sum())
        p0 = torch.sigmoid(z[torch.arange(len(b.indices)), b.starts.to(z.device)].float())
        l0 = remaining_from_p(p0.double(), gamma).tolist()
        for row, i in enumerate(b.indices):
            e = examples[i]
            boundary.setdefault(e.prompt_id, l0[row])  # same prompt -> same s_0 value
            lengths.setdefault(e.prompt_id, []).append(e.length)
    model.train()
    ids = sorted(boundary)
    out = {"val_loss": sse / max(n_tok, 1), "val_tokens": n_tok, "val_prompts": len(ids)}
    if mre_lengths is not None:
        lengths = {i: mre_lengths[i] for i in ids}
    if ids:
        out["mre"] = prompt_boundary_mre([boundary[i] for i in ids], [lengths[i] for i in ids],
                                         gamma)
    return out


def accumulate_gradients(model: LenVMForTraining, group: Sequence[Batch], cfg: TrainConfig,
                         cache: Optional[StateCache] = None) -> tuple[float, int]:
    """Backward of eq. 9 over the micro-batches of one optimizer step; returns (sum of
    squared errors, supervised tokens). Every micro-batch's squared-error sum is divided by
    the token count of the whole group, so the gradient equals that of one big batch."""
    n_tokens = sum(b.n_tokens for b in group)
    total = 0.0
    for b in group:
        z = values(model, b, cfg, cache)
        sse = squared_error_sum(z, b.targets.to(z.device), b.mask.to(z.device),
                                b.censored.to(z.device))
        (sse / max(n_tokens, 1)).backward()
        total += float(sse.detach())
    return total, n_tokens


def constant_baseline_mre(train: Sequence[Example], val_lengths: dict[str, list[int]],
                          gamma: float) -> float:
    """MRE of predicting one length for every prompt (the training set's L_GT): what the
    LenVM must beat to show it reads the prompt."""
    const = ground_truth_length([e.length for e in train], gamma)
    ids = sorted(val_lengths)
    return prompt_boundary_mre([const] * len(ids), [val_lengths[i] for i in ids], gamma)


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(model: LenVMForTraining, train_ex: Sequence[Example], val_ex: Sequence[Example],
          gamma: float, cfg: TrainConfig, cache_frozen: bool = False,
          val_lengths: Optional[dict[str, list[int]]] = None) -> list[dict]:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model.to(cfg.device)
    model.train()
    train_cache = val_cache = None
    if cache_frozen and model.frozen:
        train_cache = StateCache(model, train_ex, cfg, "caching frozen layers (train)")
        if val_ex:
            val_cache = StateCache(model, val_ex, cfg, "caching frozen layers (val)")

    head = list(model.v_head.parameters())
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": cfg.head_lr}]
    if body:
        groups.append({"params": body, "lr": cfg.lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in groups]

    micro_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = max(1, int(total * cfg.warmup_ratio))
    history: list[dict] = []
    step = 0
    params = [p for g in groups for p in g["params"]]
    for epoch in range(cfg.epochs):
        t0 = time.time()
        micro = list(batches(train_ex, cfg.batch_size, gamma, shuffle=True,
                             seed=cfg.seed * 1000 + epoch))
        run_sse, run_tok = 0.0, 0
        bar = tqdm(total=min(steps_per_epoch, total - step), desc=f"epoch {epoch + 1}",
                   unit="step", disable=not cfg.progress)
        for k in range(0, len(micro), cfg.grad_accum):
            if step >= total:
                break
            sse, n_tokens = accumulate_gradients(model, micro[k: k + cfg.grad_accum], cfg,
                                                 train_cache)
            run_sse += sse
            run_tok += n_tokens
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scale = _schedule(step, total, warmup)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * scale
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{run_sse / max(run_tok, 1):.5f}", gnorm=f"{float(gnorm):.3f}")
        bar.close()
        record = {"epoch": epoch + 1, "step": step, "train_loss": run_sse / max(run_tok, 1),
                  "train_tokens": run_tok, "seconds": round(time.time() - t0, 1)}
        if val_ex:
            record.update(evaluate(model, val_ex, gamma, cfg, val_cache, val_lengths))
        history.append(record)
        logger.info("epoch %d: %s", epoch + 1, record)
        if cfg.progress:
            msg = ", ".join(f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in record.items())
            tqdm.write(msg)
        if step >= total:
            break
    return history
