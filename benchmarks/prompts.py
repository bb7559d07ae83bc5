"""Prompt sets and the requests made from them: JSONL prompt files, an even subset, chat
messages, and the sampling arguments and request bodies of unguided samples."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

DATA = Path(__file__).resolve().parent / "data"


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def spread(rows: list, limit: Optional[int]) -> list:
    """`limit` rows evenly spaced over `rows` (all of them without a limit)."""
    if limit is None or limit >= len(rows):
        return rows
    return [rows[i * len(rows) // limit] for i in range(max(limit, 0))]


def plain_messages(row: dict) -> list[dict]:
    """The chat messages of a prompt row without any length requirement: `messages`, else a
    user message from `prompt` (our prompt files), else from `raw_data` (LIFEBench rows)."""
    if row.get("messages"):
        return row["messages"]
    text = row.get("prompt") or row.get("raw_data")
    if not text:
        raise ValueError(f"prompt row {row.get('id')} has no messages, prompt or raw_data")
    return [{"role": "user", "content": text}]


def add_sampling_args(ap: argparse.ArgumentParser, *, n: int, n_help: str,
                      max_tokens: int) -> None:
    """Prompt file, how many prompts, and how to sample from each (unguided, temperature 1)."""
    ap.add_argument("--prompts", default=str(DATA / "length_prompts.jsonl"),
                    help="JSONL rows with messages, prompt or raw_data")
    ap.add_argument("--limit", type=int, help="use N prompts spread evenly over the file "
                    "(our set is ordered by language and category, so every group stays)")
    ap.add_argument("--n", type=int, default=n, help=n_help)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=16)


def sampling_body(args, model: str, messages: list[dict], **extra) -> dict:
    """A chat request sampled as add_sampling_args describes."""
    return {"model": model, "messages": messages, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "top_p": args.top_p, **extra}
