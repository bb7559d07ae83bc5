"""Distil the one-pass candidate head (value_head.CandidateHead) from a LenVM's star tree.

    python -m sglang_lenvm.train --candidate-head --lenvm LENVM --base BASE --data samples.jsonl

No labels: on sampled text (generate_data JSONL), at up to --positions states per completion,
the candidates are the base model's top-K next tokens (stop tokens aside: the server gives them
value 0 whatever a head says), and the teacher is the LenVM itself, scoring each candidate x
on the state s + x as the server's star tree does. One teacher forward per completion runs the
text plus all its candidates, each candidate seeing its prefix and itself (`star_values`).
The token the text actually took is one more candidate, whose target is the next state's
value (the TD target; free, from the same forward). The head then learns
sigmoid(head(h_s, e(x))) ~ teacher p(s + x) (MSE in p, as the value head's training), from the
state's final hidden state h_s and x's input embedding e(x), both frozen.

Writes candidate_head.safetensors (`c_head.*`) into the LenVM directory (or --output) and
candidate_head_summary.json: held-out errors against the teacher, beside those of the head's
starting point (every candidate gets the state's own value).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import List

import torch

from sglang_lenvm.returns import remaining_from_p

logger = logging.getLogger("sglang_lenvm.train")


@dataclasses.dataclass
class Distilled:
    """Teacher values at sampled states: hidden [N, H], candidate ids [N, C] (-1: none),
    teacher p [N, C]; column C-1 is the token the text took."""

    hidden: torch.Tensor
    ids: torch.Tensor
    p: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.ids >= 0


def load_teacher(lenvm_path: str, dtype=torch.float32):
    """The LenVM as transformers runs it: backbone (sdpa) + its value head."""
    from transformers import AutoModel

    from sglang_lenvm.checkpoint import load_head_tensors
    from sglang_lenvm.value_head import ValueHead

    backbone = AutoModel.from_pretrained(lenvm_path, dtype=dtype,
                                         attn_implementation="sdpa").eval()
    head = ValueHead(backbone.config.hidden_size)
    head.load_state_dict({k[len("v_head."):]: v.float()
                          for k, v in load_head_tensors(lenvm_path).items()})
    return backbone, head.eval()


@torch.no_grad()
def star_values(backbone, head, seq: torch.Tensor, states: torch.Tensor,
                cands: torch.Tensor):
    """One forward over the text `seq` [n] and the candidates `cands` [P, K] after `states`
    [P] (indices into seq): candidate (i, j) sits at position states[i] + 1 and sees
    seq[:states[i] + 1] and itself. Returns the final hidden states at `states` [P, H], the
    candidates' raw values z [P, K] and the text's own z [n]."""
    n, (P, K) = seq.shape[0], cands.shape
    m = P * K
    tokens = torch.cat([seq, cands.reshape(-1)]).view(1, -1)
    cand_state = states.repeat_interleave(K)
    pos = torch.cat([torch.arange(n), cand_state + 1]).view(1, -1)
    allowed = torch.zeros(n + m, n + m, dtype=torch.bool)
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    rows = n + torch.arange(m)
    allowed[rows, :n] = torch.arange(n).view(1, n) <= cand_state.view(m, 1)
    allowed[rows, rows] = True
    hidden = backbone.embed_tokens(tokens)
    rope = backbone.rotary_emb(hidden, position_ids=pos)
    mask = allowed.view(1, 1, n + m, n + m)
    for layer in backbone.layers:
        out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        hidden = out[0] if isinstance(out, tuple) else out
    hidden = backbone.norm(hidden)[0].float()
    z = head(hidden)
    return hidden[states], z[n:].view(P, K), z[:n]


@torch.no_grad()
def distil_examples(examples, base, backbone, head, stop_ids: List[int], *, top_k: int,
                    positions: int, seed: int, progress: bool = True) -> Distilled:
    """Teacher values for `examples` (training.data.Example) at up to `positions` states each."""
    rng = random.Random(seed)
    hs, ids, ps = [], [], []
    tic = time.time()
    for k, ex in enumerate(examples):
        seq = torch.tensor(ex.input_ids)
        all_states = list(range(ex.start, ex.start + ex.n_supervised))
        chosen = sorted(rng.sample(all_states, min(positions, len(all_states))))
        states = torch.tensor(chosen)
        logits = base(seq.view(1, -1)).logits[0, states].float()
        if stop_ids:
            logits[:, stop_ids] = float("-inf")
        cands = logits.topk(top_k, dim=-1).indices
        h, z_cand, z_seq = star_values(backbone, head, seq, states, cands)
        # The taken token: the text's next token, valued by the next state (the TD target);
        # none after the last state, whose next token is the EOS that ended the text.
        has_next = states + 1 < seq.shape[0]
        taken = torch.where(has_next, seq[(states + 1).clamp(max=seq.shape[0] - 1)], -1)
        z_taken = torch.where(has_next, z_seq[(states + 1).clamp(max=seq.shape[0] - 1)], 0.0)
        hs.append(h)
        ids.append(torch.cat([cands, taken.view(-1, 1)], 1))
        ps.append(torch.sigmoid(torch.cat([z_cand, z_taken.view(-1, 1)], 1)))
        if progress and (k + 1) % 10 == 0:
            logger.info("teacher values: %d / %d completions (%.0f s)", k + 1, len(examples),
                        time.time() - tic)
    return Distilled(torch.cat(hs), torch.cat(ids), torch.cat(ps))


def _predict(cand_head, embed: torch.Tensor, data: Distilled) -> torch.Tensor:
    return torch.sigmoid(cand_head(data.hidden, embed[data.ids.clamp_min(0)]))


def evaluate(p_pred: torch.Tensor, data: Distilled, gamma: float) -> dict:
    """Errors against the teacher over valid candidates, and how often the top-K candidate
    the teacher values highest (longest continuation) / lowest is the head's too."""
    valid = data.valid
    err = (p_pred - data.p).abs()[valid]
    top = slice(0, data.ids.shape[1] - 1)  # the top-K columns (not the taken token)

    def length(p):
        return torch.log1p(remaining_from_p(p.double().clamp(max=1 - 1e-9), gamma))

    log_err = (length(p_pred) - length(data.p)).abs()[valid]
    agree_max = (p_pred[:, top].argmax(1) == data.p[:, top].argmax(1)).float().mean()
    agree_min = (p_pred[:, top].argmin(1) == data.p[:, top].argmin(1)).float().mean()
    return {"mae_p": float(err.mean()), "log1p_length_mae": float(log_err.mean()),
            "argmax_agreement": float(agree_max), "argmin_agreement": float(agree_min),
            "states": int(data.ids.shape[0]), "candidates": int(valid.sum())}


def fit(cand_head, embed: torch.Tensor, train: Distilled, *, epochs: int, lr: float,
        batch: int, seed: int, weight_decay: float = 0.0) -> List[float]:
    """MSE in p over valid candidates; returns the mean training loss per epoch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(cand_head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(train.ids.shape[0], generator=g)
        total = count = 0.0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            part = Distilled(train.hidden[idx], train.ids[idx], train.p[idx])
            pred = _predict(cand_head, embed, part)
            valid = part.valid
            loss = ((pred - part.p) ** 2)[valid].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * int(valid.sum())
            count += int(valid.sum())
        losses.append(total / max(count, 1))
    return losses


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sglang_lenvm.train --candidate-head",
                                description="Distil a one-pass candidate head from a LenVM's "
                                            "star-tree values on sampled text.")
    p.add_argument("--lenvm", required=True, help="trained LenVM checkpoint (the teacher)")
    p.add_argument("--base", required=True, help="the base model (its top-K are the candidates)")
    p.add_argument("--data", required=True, nargs="+", help="generate_data JSONL file(s)")
    p.add_argument("--val-data", nargs="*", default=None,
                   help="held-out JSONL; default: --val-fraction of the training prompts")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--output", default=None,
                   help="directory for candidate_head.safetensors (default: --lenvm)")
    p.add_argument("--top-k", type=int, default=15, help="candidates per state (the server's "
                                                         "default --lenvm-top-k)")
    p.add_argument("--positions", type=int, default=32, help="states per completion")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="at most this many training completions (teacher cost is per text)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--truncated", choices=["skip", "censored", "as-ended"], default="censored",
                   help="cut completions: their text is as good for distillation as any")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=256, help="states per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-cache", default=None,
                   help="a .pt file: the teacher's values are read from it if it exists, else "
                        "computed and saved there (refitting the head then skips the LenVM "
                        "forwards, the slow part)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_lenvm.checkpoint import CANDIDATE_HEAD_FILE, inspect_checkpoint
    from sglang_lenvm.config import resolve_gamma
    from sglang_lenvm.training.data import load_examples, split_by_prompt
    from sglang_lenvm.value_head import CandidateHead

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_start = time.time()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    train_ex, _ = load_examples(args.data, tokenizer, args.truncated, args.max_seq_len)
    if args.val_data:
        val_ex, _ = load_examples(args.val_data, tokenizer, args.truncated, args.max_seq_len)
    else:
        train_ex, val_ex = split_by_prompt(train_ex, args.val_fraction, args.seed)
    if args.max_sequences is not None:
        train_ex = random.Random(args.seed).sample(train_ex,
                                                   min(args.max_sequences, len(train_ex)))
    if not train_ex or not val_ex:
        raise SystemExit("need training and held-out completions")
    gamma = resolve_gamma(None, inspect_checkpoint(args.lenvm).gamma)
    stop_ids = sorted({i for i in (tokenizer.eos_token_id,
                                   tokenizer.convert_tokens_to_ids("<|im_end|>"))
                       if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id})

    backbone, value_head = load_teacher(args.lenvm)
    cache = Path(args.teacher_cache) if args.teacher_cache else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        train, val = Distilled(**saved["train"]), Distilled(**saved["val"])
        logger.info("teacher values from %s", cache)
    else:
        base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
        kw = dict(top_k=args.top_k, positions=args.positions)
        train = distil_examples(train_ex, base, backbone, value_head, stop_ids, seed=args.seed,
                                **kw)
        val = distil_examples(val_ex, base, backbone, value_head, stop_ids, seed=args.seed + 1,
                              **kw)
        del base
        if cache is not None:
            torch.save({"train": dataclasses.asdict(train), "val": dataclasses.asdict(val)},
                       cache)
    t_teacher = time.time() - t_start
    embed = backbone.embed_tokens.weight.detach().float()

    cand_head = CandidateHead(backbone.config.hidden_size)
    cand_head.init_from(value_head)
    with torch.no_grad():
        start_metrics = evaluate(_predict(cand_head, embed, val), val, gamma)
    losses = fit(cand_head, embed, train, epochs=args.epochs, lr=args.lr,
                 batch=args.batch_size, seed=args.seed, weight_decay=args.weight_decay)
    with torch.no_grad():
        metrics = evaluate(_predict(cand_head, embed, val), val, gamma)
        train_metrics = evaluate(_predict(cand_head, embed, train), train, gamma)

    out_dir = Path(args.output or args.lenvm)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"c_head.{k}": v.detach().float().contiguous()
               for k, v in cand_head.state_dict().items()}
    save_file(tensors, str(out_dir / CANDIDATE_HEAD_FILE), metadata={"format": "pt"})
    summary = {
        "lenvm": args.lenvm, "base": args.base, "gamma": gamma, "stop_ids": stop_ids,
        "top_k": args.top_k, "positions_per_completion": args.positions,
        "train_completions": len(train_ex), "val_completions": len(val_ex),
        "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
        "train_loss": losses,
        "held_out": metrics, "held_out_at_start": start_metrics, "train": train_metrics,
        "teacher_seconds": round(t_teacher, 1),
        "seconds": round(time.time() - t_start, 1),
        "note": "errors against the LenVM's own star-tree values (the teacher); at_start: "
                "the head before training, i.e. every candidate valued as its state",
    }
    (out_dir / "candidate_head_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("candidate head -> %s; held-out %s (at start %s)", out_dir / CANDIDATE_HEAD_FILE,
                metrics, start_metrics)
    return summary
