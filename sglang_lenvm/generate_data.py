"""`python -m sglang_lenvm.generate_data`: sample completions for LenVM training.

LenVM training needs no labels, only the base model's own completions: for every prompt, n
samples at the decoding settings you will serve with (temperature 1.0 / top_p 1.0 by default,
the base policy whose length distribution the LenVM learns). Any OpenAI-compatible server works
(ours, SGLang, vLLM): chat prompts go to /v1/chat/completions, text prompts to /v1/completions.

Input: a JSONL file, one prompt per line, either {"messages": [...]} (chat) or {"prompt": "..."}
(text), with an optional "id" (default: the line number) and any other fields, which are copied
into each record under "meta".

Output: JSONL, one line per completion:
  prompt_id, sample_index, messages | prompt, meta,
  prompt_token_ids, completion_token_ids  token ids as the server generated them; requested
                                          with `return_token_ids` (SGLang, vLLM). A server that
                                          does not return them leaves them null and the trainer
                                          re-tokenizes prompt and text with the model's tokenizer.
  completion_text,
  completion_tokens   the length L in tokens, EOS included (the server's usage.completion_tokens)
  finish_reason       "stop" (ended by EOS or a stop string) or "length" (cut by max_tokens)
  truncated           finish_reason == "length": the true length is unknown, so the trainer
                      skips these by default (training on them as if they had ended would
                      teach the LenVM that generations stop at max_tokens)
  token_ids_source    "server" or "none"
  sampling            model, endpoint, temperature, top_p, max_tokens and any extra fields

Resumable: records already in the output file are kept and only the missing (prompt, sample)
pairs are requested, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

import requests


def load_prompts(path: str) -> list[dict]:
    prompts, seen = [], set()
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            if ("messages" in rec) == ("prompt" in rec):
                raise ValueError(f"{path}:{i + 1}: each prompt needs exactly one of "
                                 f"'messages' (chat) or 'prompt' (text)")
            pid = str(rec.get("id", i))
            if pid in seen:
                raise ValueError(f"{path}:{i + 1}: duplicate prompt id {pid!r}")
            seen.add(pid)
            meta = {k: v for k, v in rec.items() if k not in ("id", "messages", "prompt")}
            prompts.append({"id": pid, "messages": rec.get("messages"),
                            "prompt": rec.get("prompt"), "meta": meta})
    return prompts


def done_samples(path: Path) -> dict[str, set[int]]:
    """prompt_id -> sample indices already written (a torn last line is ignored and dropped)."""
    done: dict[str, set[int]] = {}
    if not path.exists():
        return done
    good_lines = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted write: it is requested again
            good_lines.append(line if line.endswith("\n") else line + "\n")
            done.setdefault(str(rec["prompt_id"]), set()).add(int(rec["sample_index"]))
    with open(path, "w") as f:  # rewrite without the torn line so appends stay valid JSONL
        f.writelines(good_lines)
    return done


def api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def default_model(base: str, headers: dict) -> str:
    r = requests.get(base + "/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def request_body(prompt: dict, args, model: str) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "n": 1, "stream": False,
            # SGLang and vLLM return the sampled token ids with this (others ignore it).
            "return_token_ids": True}
    if args.top_k is not None:
        body["top_k"] = args.top_k
    body.update(args.extra_body)
    if prompt["messages"] is not None:
        return "/chat/completions", {**body, "messages": prompt["messages"]}
    return "/completions", {**body, "prompt": prompt["prompt"]}


def parse_choice(endpoint: str, data: dict) -> dict:
    """Token ids, text, length and finish reason from one n=1 response."""
    choice = data["choices"][0]
    if endpoint == "/chat/completions":
        text = (choice.get("message") or {}).get("content") or ""
        ids = choice.get("response_token_ids", choice.get("token_ids"))
    else:
        text = choice.get("text") or ""
        ids = choice.get("token_ids")
    prompt_ids = choice.get("prompt_token_ids", data.get("prompt_token_ids"))
    usage = data.get("usage") or {}
    n_tokens = usage.get("completion_tokens")
    if n_tokens is None:
        if ids is None:
            raise ValueError("the server returned neither usage.completion_tokens nor token ids")
        n_tokens = len(ids)
    return {"completion_text": text, "completion_token_ids": ids, "prompt_token_ids": prompt_ids,
            "completion_tokens": int(n_tokens), "finish_reason": choice.get("finish_reason")}


def sample_one(session: requests.Session, base: str, headers: dict, prompt: dict, index: int,
               args, model: str) -> dict:
    endpoint, body = request_body(prompt, args, model)
    last_error: Optional[Exception] = None
    for attempt in range(args.retries + 1):
        try:
            r = session.post(base + endpoint, json=body, headers=headers, timeout=args.timeout)
            if r.status_code >= 400:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            out = parse_choice(endpoint, r.json())
            break
        except (requests.RequestException, RuntimeError, ValueError, KeyError) as e:
            last_error = e
            time.sleep(min(2 ** attempt, 30))
    else:
        raise RuntimeError(f"prompt {prompt['id']} sample {index}: {last_error}")
    sampling = {k: v for k, v in body.items() if k not in ("messages", "prompt", "stream", "n",
                                                           "return_token_ids")}
    return {
        "prompt_id": prompt["id"],
        "sample_index": index,
        "messages": prompt["messages"],
        "prompt": prompt["prompt"],
        "meta": prompt["meta"],
        **out,
        "truncated": out["finish_reason"] == "length",
        "token_ids_source": "server" if out["completion_token_ids"] is not None else "none",
        "sampling": {**sampling, "endpoint": endpoint},
    }


def run(args) -> dict:
    from tqdm import tqdm

    prompts = load_prompts(args.prompts)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_samples(out_path)
    if args.shuffle_seed is not None:
        # Prompt order decides what a stopped run has: shuffled, a partial run covers every
        # kind of prompt in the file instead of its first section. A prompt's samples stay
        # together, so the prompts that are done have all n.
        random.Random(args.shuffle_seed).shuffle(prompts)
    todo = [(p, i) for p in prompts for i in range(args.n) if i not in done.get(p["id"], set())]
    complete = sum(1 for p in prompts if len(done.get(p["id"], set()) & set(range(args.n))) >= args.n)
    print(f"{len(prompts)} prompts x {args.n} samples: {complete} prompts already complete, "
          f"{len(todo)} samples to request", file=sys.stderr)
    stats = {"requested": len(todo), "written": 0, "failed": 0, "truncated": 0, "tokens": 0}
    if not todo:
        return stats

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = api_base(args.base_url)
    model = args.model or default_model(base, headers)
    lock = threading.Lock()
    local = threading.local()

    def task(item):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return sample_one(local.session, base, headers, item[0], item[1], args, model)

    start = time.time()
    with open(out_path, "a") as out, ThreadPoolExecutor(args.concurrency) as pool, \
            tqdm(total=len(todo), desc="samples", unit="sample", disable=args.quiet) as bar:
        futures = [pool.submit(task, item) for item in todo]
        for fut in as_completed(futures):
            try:
                rec = fut.result()
            except RuntimeError as e:
                stats["failed"] += 1
                tqdm.write(f"failed: {e}", file=sys.stderr)
                bar.update(1)
                continue
            with lock:
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
            stats["written"] += 1
            stats["truncated"] += rec["truncated"]
            stats["tokens"] += rec["completion_tokens"]
            bar.update(1)
            bar.set_postfix(tok_s=f"{stats['tokens'] / max(time.time() - start, 1e-9):.0f}",
                            cut=stats["truncated"])
    stats["seconds"] = round(time.time() - start, 1)
    print(json.dumps(stats), file=sys.stderr)
    return stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m sglang_lenvm.generate_data",
        description="Sample n completions per prompt from an OpenAI-compatible server, "
                    "as JSONL training data for a LenVM.")
    p.add_argument("--prompts", required=True,
                   help='JSONL, one {"messages": [...]} or {"prompt": "..."} per line '
                        '(optional "id"; other fields are kept under "meta")')
    p.add_argument("--output", required=True, help="JSONL to append to (resumed if it exists)")
    p.add_argument("--base-url", default="http://127.0.0.1:30000",
                   help="server URL, with or without /v1 (default %(default)s)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("-n", "--n", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="completion cap; samples that hit it are marked truncated (default 1024)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="not sent unless given")
    p.add_argument("--extra-body", type=json.loads, default={},
                   help='JSON object merged into every request, e.g. \'{"min_p": 0.01}\'')
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="request prompts in a seeded random order (a partial run then covers "
                        "all kinds of prompts)")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.max_tokens < 1:
        p.error("--n, --concurrency and --max-tokens must be >= 1")
    if not isinstance(args.extra_body, dict):
        p.error("--extra-body must be a JSON object")
    return args


def main(argv=None) -> None:
    stats = run(parse_args(argv))
    if stats["failed"]:
        sys.exit(f"{stats['failed']} samples failed; run the same command again to retry them")


if __name__ == "__main__":
    main()
