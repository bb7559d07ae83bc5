"""`python -m sglang_lenvm.train`: train a LenVM on completions sampled from its base model.

    python -m sglang_lenvm.generate_data --prompts prompts.jsonl --output samples.jsonl ...
    python -m sglang_lenvm.train --base BASE --data samples.jsonl --output my-lenvm
    python -m sglang_lenvm.launch_server --model-path BASE --lenvm-path my-lenvm

The LenVM is the base checkpoint's backbone + a fresh value head. For every completion of
length L (EOS included) the states t = 0..L-1, from the last prompt token on, are regressed
to G_t = -(1 - gamma^(L-t)) with prediction -sigmoid(z), and the loss is the mean squared
error over all supervised tokens of the batch (paper eq. 9). Completions cut by max_tokens are
skipped by default (their length is unknown; `--truncated censored` keeps them with a one-sided
loss, since their length is a lower bound). gamma defaults to the value with 1 - gamma^L99 = 0.99 for
the 99th-percentile training length.

Output: the published layout (backbone + value_head.safetensors, `lenvm_gamma` in config.json,
tokenizer files copied from the base) and `training_summary.json` with per-epoch metrics.

A second step, optional: `--candidate-head` distils the one-pass candidate head of a trained
LenVM from its star-tree values (training/candidate_head.py; served with
`--lenvm-scoring one-pass`):

    python -m sglang_lenvm.train --candidate-head --lenvm my-lenvm --base BASE --data samples.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from sglang_lenvm.training.checkpoint import base_files_dir, save_backbone_and_head
from sglang_lenvm.training.data import load_examples, split_by_prompt
from sglang_lenvm.training.loop import TrainConfig, constant_baseline_mre, train
from sglang_lenvm.training.model import LenVMForTraining, layer_config_overrides
from sglang_lenvm.summary_stats import percentile
from sglang_lenvm.training.targets import default_gamma, token_targets

logger = logging.getLogger("sglang_lenvm.train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sglang_lenvm.train",
                                description="Train a Length Value Model (LenVM) on sampled "
                                            "completions (JSONL from sglang_lenvm.generate_data).")
    p.add_argument("--base", required=True,
                   help="base checkpoint (directory or hub id) whose backbone the LenVM starts "
                        "from; its tokenizer must be the sampled model's")
    p.add_argument("--data", required=True, nargs="+", help="training JSONL file(s)")
    p.add_argument("--val-data", nargs="*", default=None,
                   help="validation JSONL (held-out prompts); default: --val-fraction of the "
                        "training prompts")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="prompts held out for validation when no --val-data (default 0.1)")
    p.add_argument("--val-loss-samples", type=int, default=None,
                   help="run at most K completions per validation prompt through the model "
                        "(the validation loss); the MRE's L_GT still uses all of them")
    p.add_argument("--output", required=True, help="LenVM checkpoint directory to write")
    p.add_argument("--gamma", type=float, default=None,
                   help="discount factor (default: 1 - gamma^L99 = 0.99 for the 99th-percentile "
                        "training length)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="backbone learning rate")
    p.add_argument("--head-lr", type=float, default=1e-3, help="value head learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="cut longer sequences (their remaining states keep correct targets)")
    p.add_argument("--truncated", choices=["skip", "censored", "as-ended"], default="skip",
                   help="completions cut by max_tokens: skip them (default; their length is "
                        "unknown), keep them as censored (their length is a lower bound: "
                        "one-sided loss), or keep them as if they had ended")
    p.add_argument("--include-truncated", action="store_const", const="as-ended",
                   dest="truncated", help="same as --truncated as-ended")
    p.add_argument("--num-layers", type=int, default=None,
                   help="keep only the first N decoder layers of the base (a shallower, cheaper "
                        "LenVM: every scored token costs N layers); default: all")
    p.add_argument("--train-last-layers", type=int, default=None,
                   help="train only the last N layers (+ final norm + head); default: all")
    p.add_argument("--cache-frozen", action="store_true",
                   help="with --train-last-layers: run the frozen layers once and cache their "
                        "outputs (fast on CPU; memory ~ tokens x hidden x 4 bytes)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast (float32 master weights) or fp32; auto: bf16 on CUDA, "
                        "fp32 on CPU (faster there without bf16 matrix units)")
    p.add_argument("--save-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="backbone dtype in the checkpoint (auto: the base config's)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to re-tokenize records without token ids (default: --base)")
    p.add_argument("--save-trained-part", default=None,
                   help="also write only the trained tensors (+ head) to this .safetensors "
                        "file, with a .json beside it (for shipping a small delta)")
    p.add_argument("--trained-part-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--teacher", default=None,
                   help="a trained LenVM (same base tokenizer) whose values V(s_t) replace the "
                        "sampled returns as training targets: distillation, e.g. into a "
                        "shallower LenVM (training/distill.py); gamma is the teacher's. "
                        "Validation still scores against the sampled returns")
    p.add_argument("--teacher-cache", default=None,
                   help="file keeping the teacher's values, reused for the same teacher and data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tensors_sha256(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_trained_part(model: LenVMForTraining, path: str, dtype: torch.dtype, meta: dict) -> dict:
    from safetensors.torch import save_file

    tensors = {}
    for k, v in model.trained_state_dict().items():
        # The head stays float32 (it is small, and served in float32).
        keep = torch.float32 if k.startswith("v_head.") else dtype
        tensors[k] = v.detach().cpu().to(keep).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    meta = {**meta, "trained_tensors_sha256": _tensors_sha256(tensors),
            "tensors": sorted(tensors), "dtype": str(dtype).replace("torch.", ""),
            "bytes": Path(path).stat().st_size}
    Path(path).with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--candidate-head" in argv:
        from sglang_lenvm.training import candidate_head

        return candidate_head.main([a for a in argv if a != "--candidate-head"])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.startswith("cuda"))
    t_start = time.time()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.base)
    train_ex, train_stats = load_examples(args.data, tokenizer, args.truncated,
                                          args.max_seq_len)
    if args.val_data:
        val_ex, val_stats = load_examples(args.val_data, tokenizer, args.truncated,
                                          args.max_seq_len)
        overlap = {e.prompt_id for e in train_ex} & {e.prompt_id for e in val_ex}
        if overlap:
            logger.warning("%d prompt ids appear in both training and validation data",
                           len(overlap))
    else:
        train_ex, val_ex = split_by_prompt(train_ex, args.val_fraction, args.seed)
        val_stats = None
    if not train_ex:
        sys.exit("no usable training examples (all truncated or empty?)")
    val_lengths: dict[str, list[int]] = {}
    for e in val_ex:
        val_lengths.setdefault(e.prompt_id, []).append(e.length)
    if args.val_loss_samples is not None:
        seen: dict[str, int] = {}
        subset = []
        for e in val_ex:
            seen[e.prompt_id] = seen.get(e.prompt_id, 0) + 1
            if seen[e.prompt_id] <= args.val_loss_samples:
                subset.append(e)
        val_ex = subset
    lengths = [e.length for e in train_ex]
    gamma = args.gamma if args.gamma is not None else default_gamma(lengths)
    if args.teacher_cache and not args.teacher:
        sys.exit("error: --teacher-cache needs --teacher")
    if args.teacher:
        from sglang_lenvm.checkpoint import LenVMCheckpointError, inspect_checkpoint
        from sglang_lenvm.training.distill import attach_teacher

        # The teacher's values are returns under its own gamma; a student with another gamma
        # would learn a different quantity under the same name.
        try:
            teacher_gamma = inspect_checkpoint(args.teacher).gamma
        except LenVMCheckpointError as e:
            sys.exit(f"error: --teacher: {e}")
        if teacher_gamma is None:
            sys.exit(f"error: --teacher {args.teacher} records no lenvm_gamma")
        if args.gamma is not None and abs(args.gamma - teacher_gamma) > 1e-9:
            sys.exit(f"error: --gamma {args.gamma} differs from the teacher's {teacher_gamma}")
        gamma = teacher_gamma  # inspect_checkpoint has checked it is in (0, 1)
        try:
            attach_teacher(train_ex, args.teacher, cache=args.teacher_cache, device=device,
                           progress=not args.no_progress)
        except ValueError as e:  # the teacher's vocabulary does not cover the data
            sys.exit(f"error: {e}")
    if not 0 < gamma < 1:
        sys.exit(f"gamma must be in (0, 1), got {gamma}")
    logger.info("data: %d train / %d val completions; lengths p50=%.0f p99=%.0f max=%d; "
                "gamma=%.6f; %s", len(train_ex), len(val_ex), percentile(lengths, 50),
                percentile(lengths, 99), max(lengths), gamma, dataclasses.asdict(train_stats))

    try:
        model = LenVMForTraining.from_base(args.base, args.train_last_layers,
                                           num_layers=args.num_layers)
    except ValueError as e:  # --num-layers / --train-last-layers out of range
        sys.exit(f"error: {e}")
    # The head starts at the training data's mean value (see ValueHead.init_output).
    if args.teacher:
        mean_p = float(torch.cat([-e.teacher for e in train_ex]).mean())
    else:
        mean_p = float(torch.cat([-token_targets(L, gamma) for L in lengths]).mean())
    model.v_head.init_output(mean_p)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %s, %d layers, training %s (%.1fM parameters)",
                type(model.backbone).__name__, len(model.backbone.layers),
                "all layers" if not model.frozen else f"layers {model.split}.. + norm + head",
                n_train / 1e6)
    if args.cache_frozen and not model.frozen:
        logger.warning("--cache-frozen has no effect without --train-last-layers")

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay,
                      warmup_ratio=args.warmup_ratio, bf16=bf16, device=device, seed=args.seed,
                      max_steps=args.max_steps, progress=not args.no_progress)
    baseline = constant_baseline_mre(train_ex, val_lengths, gamma) if val_lengths else None
    history = train(model, train_ex, val_ex, gamma, cfg, cache_frozen=args.cache_frozen,
                    val_lengths=val_lengths)

    base_dir = base_files_dir(args.base)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    if args.save_dtype == "auto":
        name = str(base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32")
        save_dtype = getattr(torch, name, torch.float32)
    else:
        save_dtype = _DTYPES[args.save_dtype]
    model.to("cpu")
    save_backbone_and_head(args.output, model.backbone_state_dict(), model.head_state_dict(),
                           config_src=base_dir, gamma=gamma, dtype=save_dtype,
                           extra_config=layer_config_overrides(model.backbone.config,
                                                               len(model.backbone.layers)))
    summary = {
        "base": args.base, "gamma": gamma, "device": device, "bf16": bf16,
        "train_completions": len(train_ex), "val_completions": len(val_ex),
        "train_prompts": len({e.prompt_id for e in train_ex}),
        "val_prompts": len(val_lengths),
        "val_mre_completions": sum(len(v) for v in val_lengths.values()),
        "train_data": dataclasses.asdict(train_stats),
        "val_data": dataclasses.asdict(val_stats) if val_stats else None,
        "length_p50": percentile(lengths, 50), "length_p99": percentile(lengths, 99),
        "num_layers": len(model.backbone.layers),
        "train_last_layers": args.train_last_layers, "trained_parameters": n_train,
        "teacher": args.teacher,
        "config": dataclasses.asdict(cfg), "history": history,
        "constant_baseline_mre": baseline, "seconds": round(time.time() - t_start, 1),
    }
    if args.save_trained_part:
        summary["trained_part"] = save_trained_part(
            model, args.save_trained_part, _DTYPES[args.trained_part_dtype],
            {"gamma": gamma, "base": args.base, "split_layer": model.split,
             "num_layers": len(model.backbone.layers)})
    Path(args.output, "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("saved LenVM to %s (gamma %.6f); last epoch: %s", args.output, gamma,
                history[-1] if history else None)
    return summary


def cli() -> None:
    """The `sglang-lenvm-train` command (main's summary is for callers, not the exit status)."""
    main()


if __name__ == "__main__":
    cli()
