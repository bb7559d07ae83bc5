"""HTTP requests to a server's OpenAI-compatible API: plain and streamed (with the arrival time
of every token count), parallel throughput; and the LenVM's Prometheus metrics."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import requests

REQUEST_TIMEOUT_S = 3600


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


def lenvm_metrics(url: str) -> dict:
    """The LenVM's Prometheus samples (server started with --enable-metrics), summed over
    labels other than `phase`: {("sglang:lenvm_step_seconds_sum", "scoring"): 1.2,
    ("sglang:lenvm_star_forwards_total", None): 40.0, ...}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(url + "/metrics", timeout=60)
    r.raise_for_status()
    out: dict = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("sglang:lenvm_") and "le" not in s.labels:
                key = (s.name, s.labels.get("phase"))
                out[key] = out.get(key, 0.0) + s.value
    return out
