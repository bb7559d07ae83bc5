"""Helpers shared by the benchmarks: machine info, which server to talk to, OpenAI-API requests
run in parallel with a progress bar, streamed token timing, prompt files, JSON and PNG output.

Every benchmark talks to a server over the OpenAI-compatible HTTP API, chosen by one of
  --base-url URL                      a server that is already running (ours, with a LenVM)
  --model-path BASE --lenvm-path LVM  start `python -m sglang_lenvm.launch_server` on them
  --demo                              start it on the embedded demo pair (SmolLM2-135M + LenVM)
  --tiny                              build tiny random models and start it on them (smoke runs)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import requests

from sglang_lenvm.server_process import Server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "benchmarks" / "data"
REQUEST_TIMEOUT_S = 3600


# ---------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    import sglang
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "sglang": sglang.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def header(args) -> dict:
    """What every result JSON starts with: the machine, when, and every setting of the run."""
    return {"machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "settings": {k: v for k, v in vars(args).items()}}


def machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']} ({m['cpu_count']} cores), GPU: {m['gpu']}, "
            f"torch {m['torch']}, sglang {m['sglang']}")


# ---------------------------------------------------------------------------------- servers


def build_tiny(root: Path) -> tuple[str, str]:
    """A tiny random base model and LenVM sharing one tokenizer (see sglang_lenvm.tiny_models)."""
    from sglang_lenvm import tiny_models as tm

    tm.build_tokenizer(root / "tok")
    tm.build_causal_lm(root / "base", root / "tok", max_pos=8192)
    tm.build_lenvm(root / "lenvm", root / "tok", max_pos=8192)
    return str(root / "base"), str(root / "lenvm")


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its docstring as help, and the server arguments."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=doc.split("\n", 1)[1])
    add_server_args(ap)
    return ap


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


def server_settings(args) -> dict:
    """What the JSON records about the server (the arguments, and what it reports itself)."""
    return {k: getattr(args, k) for k in ("base_url", "model_path", "lenvm_path", "demo", "tiny",
                                          "server_arg", "max_total_tokens")}


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


# ---------------------------------------------------------------------------------- requests


def post(url: str, path: str, body: dict) -> dict:
    """One non-streamed OpenAI-API request; raises with the server's message on HTTP errors."""
    r = requests.post(url + path, json=body, timeout=REQUEST_TIMEOUT_S)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code} from {path}: {r.text[:500]}")
    return r.json()


def chat(url: str, body: dict) -> dict:
    """POST /v1/chat/completions. Our fields (length_target, ...) go top level, where the
    OpenAI SDK's `extra_body` puts them."""
    return post(url, "/v1/chat/completions", body)


def parallel_map(fn: Callable, items: list, concurrency: int, desc: str,
                 errors: Optional[list] = None) -> list:
    """fn over items with `concurrency` requests in flight, in order, with a progress bar.

    With `errors` given, a failing item yields None and (item index, message) is appended to
    it (a long benchmark should not die on one bad request; the JSON reports the failures);
    without it the first failure is raised.
    """
    from tqdm import tqdm

    def guarded(i_item):
        i, item = i_item
        try:
            return fn(item)
        except Exception as e:  # noqa: BLE001 - reported in the JSON, not hidden
            if errors is None:
                raise
            errors.append({"index": i, "error": f"{type(e).__name__}: {e}"[:1000]})
            return None

    with ThreadPoolExecutor(max(1, concurrency)) as ex:
        return list(tqdm(ex.map(guarded, enumerate(items)), total=len(items), desc=desc,
                         dynamic_ncols=True))


def stream_token_times(url: str, body: dict, path: str = "/v1/completions"
                       ) -> list[tuple[float, int]]:
    """(arrival time, completion tokens so far) per streamed chunk that carries usage."""
    return stream_request(url, body, path)["times"]


def stream_request(url: str, body: dict, path: str = "/v1/completions") -> dict:
    """A streamed request: send time and (arrival time, completion tokens so far) per chunk.

    SGLang's `continuous_usage_stats` puts the running token count on every chunk, so token
    positions are exact even when one chunk carries several tokens.
    """
    body = {**body, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    out = []
    start = time.perf_counter()
    with requests.post(url + path, json=body, stream=True, timeout=REQUEST_TIMEOUT_S) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code} from {path}: {r.text[:500]}")
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            usage = chunk.get("usage") or {}
            n = usage.get("completion_tokens")
            if n and (not out or n > out[-1][1]):
                out.append((time.perf_counter(), n))
    return {"start": start, "times": out}


def latency_at(times: list[tuple[float, int]], position: int, window: int) -> float:
    """Seconds per token between positions position - window and position + window.

    Streamed chunks can carry several tokens, so the rate is taken between the first chunks
    that reach the two positions rather than chunk by chunk.
    """
    def first_at(n):
        return next(((t, m) for t, m in times if m >= n), None)

    a, b = first_at(position - window), first_at(position + window)
    if a is None or b is None or b[1] <= a[1]:
        raise RuntimeError(f"not enough tokens streamed around position {position}")
    return (b[0] - a[0]) / (b[1] - a[1])


def throughput(url: str, body: dict, concurrency: int, repeats: int) -> float:
    """Median over repeats of output tokens / wall second for `concurrency` parallel requests."""
    def one(_):
        r = requests.post(url + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    runs = []
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(concurrency)))  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            tokens = sum(ex.map(one, range(concurrency)))
            runs.append(tokens / (time.perf_counter() - t))
    return statistics.median(runs)


# ---------------------------------------------------------------------------------- data


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


# ---------------------------------------------------------------------------------- output


def mean(xs: Iterable[float]) -> Optional[float]:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def percentile(xs: list[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (q in [0, 100]); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def write_json(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def finish(result: dict, out, plot: Callable, report: Callable, plots=(".png",)) -> dict:
    """Write the JSON and the plots beside it, print the report."""
    write_json(out, result)
    plot(result, *(sibling(out, suffix) for suffix in plots))
    print(report(result))
    return result


def sibling(out: str | os.PathLike, suffix: str) -> Path:
    """benchmarks/results/x.json -> benchmarks/results/x<suffix> (plots beside the JSON)."""
    out = Path(out)
    return out.with_name(out.stem + suffix)


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
