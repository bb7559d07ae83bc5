"""Which server a benchmark talks to: the server arguments, starting servers, and what a server
reports about itself.

Every benchmark talks to a server over the OpenAI-compatible HTTP API, chosen by one of
  --base-url URL                      a server that is already running (ours, with a LenVM)
  --model-path BASE --lenvm-path LVM  start `python -m sglang_lenvm.launch_server` on them
  --demo                              start it on the embedded demo pair (SmolLM2-135M + LenVM)
  --tiny                              build tiny random models and start it on them (smoke runs)
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import requests

from sglang_lenvm.testing.server_process import Server


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its docstring as help, and the server arguments."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=doc.split("\n", 1)[1])
    add_server_args(ap)
    return ap


def add_server_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("server (give one of --base-url, --model-path/--lenvm-path, "
                              "--demo, --tiny)")
    g.add_argument("--base-url", help="a running sglang-lenvm server, e.g. http://127.0.0.1:30000")
    g.add_argument("--model-path", help="base model to start a server on")
    g.add_argument("--lenvm-path", help="LenVM to start a server with")
    g.add_argument("--demo", action="store_true", help="start a server on the embedded demo pair")
    g.add_argument("--tiny", action="store_true", help="build tiny random models (smoke runs)")
    g.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for servers this script starts (repeatable, use "
                        "--server-arg=--flag for flags)")
    g.add_argument("--max-total-tokens", type=int, default=65536,
                   help="KV cache size of servers this script starts")


def build_tiny(root: Path) -> tuple[str, str]:
    """A tiny random base model and LenVM sharing one tokenizer, under `root`.

    See sglang_lenvm.testing.tiny_models.
    """
    from sglang_lenvm.testing import tiny_models as tm

    tm.build_tokenizer(root / "tok")
    tm.build_causal_lm(root / "base", root / "tok", max_pos=8192)
    tm.build_lenvm(root / "lenvm", root / "tok", max_pos=8192)
    return str(root / "base"), str(root / "lenvm")


def model_paths(args, ap) -> tuple[str, str, Optional[tempfile.TemporaryDirectory]]:
    """(base, lenvm, temporary directory to keep alive) for servers this script starts."""
    if args.tiny:
        tmp = tempfile.TemporaryDirectory(prefix="lenvm-bench-")
        return (*build_tiny(Path(tmp.name)), tmp)
    if args.demo:
        from sglang_lenvm.demo import materialize_demo

        return (*materialize_demo(), None)
    if args.model_path and args.lenvm_path:
        return args.model_path, args.lenvm_path, None
    choices = "--model-path and --lenvm-path, or --demo, or --tiny"
    ap.error(f"give --base-url, or {choices}" if hasattr(args, "base_url") else f"give {choices}")


@contextlib.contextmanager
def lenvm_server(args, ap) -> Iterator[dict]:
    """Yields {"url", "base", "lenvm"}: the --base-url server, or one started for this run."""
    if args.base_url:
        yield {"url": args.base_url.rstrip("/"), "base": None, "lenvm": None}
        return
    base, lenvm, tmp = model_paths(args, ap)
    with tempfile.TemporaryDirectory(prefix="lenvm-bench-logs-") as logs:
        with Server(["--model-path", base, "--lenvm-path", lenvm, *args.server_arg],
                    Path(logs) / "lenvm.log", max_total_tokens=args.max_total_tokens) as srv:
            yield {"url": srv.url, "base": base, "lenvm": lenvm, "tmp": tmp}


@contextlib.contextmanager
def plain_server(base: str, args) -> Iterator[str]:
    """Plain `sglang.launch_server` (no LenVM, no plugin fields) on the same base model."""
    with tempfile.TemporaryDirectory(prefix="lenvm-bench-logs-") as logs:
        with Server(["--model-path", base, *args.server_arg], Path(logs) / "plain.log",
                    module="sglang.launch_server", max_total_tokens=args.max_total_tokens) as srv:
            yield srv.url


WORK_COUNTERS = ("star_forwards", "star_rows", "star_tokens", "candidates_scored")


def lenvm_work(url: str) -> dict:
    """The LenVM's work counters (/lenvm/stats), summed over DP ranks; {} if unavailable."""
    try:
        ranks = requests.get(url + "/lenvm/stats", timeout=30).json()
        return {k: sum(int(r.get(k) or 0) for r in ranks) for k in WORK_COUNTERS}
    except (requests.RequestException, ValueError, TypeError, AttributeError) as e:
        return {"error": repr(e)}


def server_info(url: str) -> dict:
    """The served model and LenVM settings as the server reports them (best effort)."""
    info = {"url": url}
    try:
        models = requests.get(url + "/v1/models", timeout=30).json()
        info["model"] = models["data"][0]["id"]
        info["max_model_len"] = models["data"][0].get("max_model_len")
        si = requests.get(url + "/server_info", timeout=30).json()
        for key in ("model_path", "context_length", "max_total_num_tokens", "device", "dtype",
                    "attention_backend", "chunked_prefill_size"):
            if key in si:
                info[key] = si[key]
        states = si.get("internal_states") or [{}]
        info["lenvm"] = states[0].get("lenvm") if isinstance(states[0], dict) else None
    except (requests.RequestException, ValueError, KeyError, IndexError) as e:
        info["error"] = repr(e)
    return info


def model_name(url: str) -> str:
    return requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def gamma_of(url: str) -> float:
    """The server's LenVM discount factor (from /v1/length/predict, the only place it is shown)."""
    r = requests.post(url + "/v1/length/predict", json={"prompt": "Hello"}, timeout=120)
    r.raise_for_status()
    return float(r.json()["gamma"])
