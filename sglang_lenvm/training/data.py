"""Training examples from `generate_data` JSONL, and padded batches.

An example is one completion: the token sequence prompt + completion, where only the first
L-1 completion tokens are inputs (the states s_0..s_{L-1} are the last prompt token and the
tokens before EOS; the EOS state has value 0 by definition and is never supervised), and the
length L itself, from which the targets follow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from typing import Iterator, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Example:
    prompt_id: str
    input_ids: list[int]  # prompt tokens + the first L-1 completion tokens (maybe cut)
    start: int  # index of the last prompt token = state s_0
    length: int  # L: completion tokens incl. EOS (the server's usage.completion_tokens)
    # Cut by max_tokens and kept as censored: L is only a lower bound on the true length, so
    # every G_t is an upper bound on the true return (see targets.squared_error_sum).
    censored: bool = False
    # V(s_t) of a teacher LenVM for the supervised states (training/distill.py): when set it
    # is the target instead of the Monte Carlo return, and nothing is censored.
    teacher: Optional[torch.Tensor] = None

    @property
    def n_supervised(self) -> int:
        """States s_0..s_{L-1} that are inside input_ids (fewer if the sequence was cut)."""
        return min(self.length, len(self.input_ids) - self.start)


@dataclasses.dataclass
class LoadStats:
    records: int = 0
    used: int = 0
    truncated_skipped: int = 0
    truncated_kept: int = 0
    retokenized: int = 0
    cut_to_max_len: int = 0


def _prompt_ids(rec: dict, tokenizer) -> list[int]:
    if rec.get("prompt_token_ids"):
        return list(rec["prompt_token_ids"])
    if tokenizer is None:
        raise ValueError(f"record {rec.get('prompt_id')} has no token ids; pass --tokenizer "
                         f"(the base model) to re-tokenize")
    if rec.get("messages") is not None:
        ids = tokenizer.apply_chat_template(rec["messages"], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(rec["prompt"])


def _completion_ids(rec: dict, tokenizer) -> list[int]:
    if rec.get("completion_token_ids") is not None:
        return list(rec["completion_token_ids"])
    if tokenizer is None:
        raise ValueError(f"record {rec.get('prompt_id')} has no completion token ids; "
                         f"pass --tokenizer to re-tokenize")
    # Re-tokenizing the text may not reproduce the sampled ids exactly; the targets still use
    # the server's completion_tokens, so only the inputs can differ slightly.
    return tokenizer.encode(rec["completion_text"], add_special_tokens=False)


TRUNCATED_MODES = ("skip", "censored", "as-ended")


def record_to_example(rec: dict, tokenizer=None, max_seq_len: Optional[int] = None,
                      censored: bool = False) -> Example:
    prompt = _prompt_ids(rec, tokenizer)
    completion = _completion_ids(rec, tokenizer)
    length = int(rec["completion_tokens"])
    if length < 1 or not prompt:
        raise ValueError(f"record {rec.get('prompt_id')}: empty prompt or completion")
    ids = prompt + completion[: length - 1]
    if max_seq_len is not None and len(ids) > max_seq_len:
        # Targets come from the full length L, so a cut sequence keeps correct targets for
        # the states it still has (like the reference trainer's cutoff).
        ids = ids[:max_seq_len]
    if len(ids) < len(prompt):
        raise ValueError(f"record {rec.get('prompt_id')}: prompt longer than max_seq_len")
    return Example(prompt_id=str(rec["prompt_id"]), input_ids=ids, start=len(prompt) - 1,
                   length=length, censored=censored)


def load_examples(paths: Sequence[str], tokenizer=None, truncated: str = "skip",
                  max_seq_len: Optional[int] = None) -> tuple[list[Example], LoadStats]:
    """Examples from generate_data JSONL. Completions cut by max_tokens (`truncated`) are
    skipped ("skip"), kept with their length as a lower bound ("censored"), or kept as if
    they had ended there ("as-ended", which teaches that text stops at max_tokens)."""
    if truncated not in TRUNCATED_MODES:
        raise ValueError(f"truncated must be one of {TRUNCATED_MODES}, got {truncated!r}")
    stats = LoadStats()
    out = []
    for path in paths:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                stats.records += 1
                cut = bool(rec.get("truncated"))
                if cut and truncated == "skip":
                    # Cut by max_tokens: the true length is unknown (only that it is larger).
                    stats.truncated_skipped += 1
                    continue
                stats.truncated_kept += cut
                if rec.get("completion_token_ids") is None or not rec.get("prompt_token_ids"):
                    stats.retokenized += 1
                ex = record_to_example(rec, tokenizer, max_seq_len,
                                       censored=cut and truncated == "censored")
                stats.cut_to_max_len += ex.n_supervised < ex.length
                out.append(ex)
    stats.used = len(out)
    return out, stats


def split_by_prompt(examples: list[Example], fraction: float, seed: int = 0):
    """(train, val): whole prompts go to validation, so it measures unseen prompts."""
    ids = sorted({e.prompt_id for e in examples})
    random.Random(seed).shuffle(ids)
    n_val = max(1, round(len(ids) * fraction)) if fraction > 0 and len(ids) > 1 else 0
    val_ids = set(ids[:n_val])
    return ([e for e in examples if e.prompt_id not in val_ids],
            [e for e in examples if e.prompt_id in val_ids])


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    targets: torch.Tensor  # [B, T] G_t at the supervised positions, 0 elsewhere
    mask: torch.Tensor  # [B, T] 1.0 at supervised positions
    censored: torch.Tensor  # [B, T] 1.0 where the target is only an upper bound
    starts: torch.Tensor  # [B] position of s_0
    indices: list[int]  # positions of these examples in the dataset (for cached states)

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum().item())


def collate(examples: Sequence[Example], indices: Sequence[int], gamma: float,
            pad_id: int = 0) -> Batch:
    """Right padding: with a causal model, real tokens never attend to the pads after them,
    so no attention mask is needed and the pads' outputs are simply not supervised."""
    from sglang_lenvm.training.targets import token_targets

    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.zeros(B, T)
    mask = torch.zeros(B, T)
    censored = torch.zeros(B, T)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        n = e.n_supervised
        if e.teacher is not None:
            targets[i, e.start: e.start + n] = e.teacher[:n]
        else:
            targets[i, e.start: e.start + n] = token_targets(e.length, gamma)[:n]
        mask[i, e.start: e.start + n] = 1.0
        if e.censored and e.teacher is None:
            censored[i, e.start: e.start + n] = 1.0
    return Batch(input_ids, targets, mask, censored, torch.tensor([e.start for e in examples]),
                 list(indices))


def batches(examples: Sequence[Example], batch_size: int, gamma: float, *, shuffle: bool,
            seed: int = 0, pad_id: int = 0) -> Iterator[Batch]:
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        yield collate([examples[j] for j in idx], idx, gamma, pad_id)
