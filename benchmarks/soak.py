"""Soak test: hours of traffic in minutes, then check nothing leaked.

    python -m benchmarks.soak --tiny --seconds 120 --clients 32
    python -m benchmarks.soak --base-url http://127.0.0.1:30000 --seconds 600

Phase 1 (unguided only, --baseline-seconds): unguided latency without guided load.
Phase 2 (--seconds): `--clients` concurrent clients send a mix of unguided and guided requests
(equal / at_most / at_least / beta / value traces), with shared and unique prefixes, streaming
and not; some clients hang up mid-stream and some requests are aborted with /abort_request.
Afterwards it checks, and reports in JSON:
- zero failed valid requests (anything but 200 on a valid request, or a broken response);
- the server's resident memory (all its processes) grew by less than --rss-bound-mb between
  the end of a warm-up and the end of the run;
- every KV slot is back to idle (free or held unlocked by the radix cache, nothing running or
  waiting, see /lenvm/stats), and after /flush_cache every slot is free;
- unguided latency p50/p99 with and without concurrent guided load.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

from benchmarks.reporting import machine_info, write_json
from benchmarks.servers import model_paths
from sglang_lenvm.summary_stats import percentile

SHARED = "You are a helpful assistant. Answer carefully and completely. " * 8


def rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def lenvm_stats(url: str) -> dict:
    return requests.get(url + "/lenvm/stats", timeout=30).json()[0]


def idle(url: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    s = lenvm_stats(url)
    while time.time() < deadline:
        s = lenvm_stats(url)
        if (s["running_requests"] == 0 and s["waiting_requests"] == 0 and s["protected_slots"] == 0
                and s["free_slots"] + s["evictable_slots"] == s["kv_pool_tokens"]):
            return {"idle": True, **s}
        time.sleep(0.5)
    return {"idle": False, **s}


class Client(threading.Thread):
    def __init__(self, url, rng, stop_at, guided_share, records, lock):
        super().__init__(daemon=True)
        self.url, self.rng, self.stop_at = url, rng, stop_at
        self.guided_share, self.records, self.lock = guided_share, records, lock

    def request(self):
        r = self.rng
        prompt = (SHARED if r.random() < 0.5 else f"[{uuid.uuid4().hex[:8]}] ") + \
            r.choice(["Describe the sea.", "List three prime numbers.", "Tell a story about a fox.",
                      "Explain rain to a child."])
        body = {"model": "m", "prompt": prompt, "max_tokens": r.randint(8, 64),
                "temperature": r.choice([0.0, 0.7, 1.0])}
        guided = r.random() < self.guided_share
        if guided:
            kind = r.choice(["equal", "at_most", "at_least", "beta", "values"])
            target = r.randint(4, body["max_tokens"])
            if kind in ("equal", "at_most", "at_least"):
                body.update(length_target=target, length_mode=kind)
            elif kind == "beta":
                body["beta"] = r.choice([-20.0, -5.0, 5.0])
            else:
                body["return_length_values"] = True
        action = r.random()
        return body, guided, ("hangup" if action < 0.05 else "abort" if action < 0.1 else
                              "stream" if action < 0.4 else "plain")

    def run(self):
        while time.time() < self.stop_at:
            body, guided, action = self.request()
            t = time.perf_counter()
            ok, note = True, ""
            try:
                if action == "hangup":
                    with requests.post(self.url + "/v1/completions", json={**body, "stream": True},
                                       stream=True, timeout=300) as resp:
                        for i, _ in enumerate(resp.iter_lines()):
                            if i >= 2:
                                break
                elif action == "abort":
                    rid = f"soak-{uuid.uuid4().hex}"
                    gen = {"text": body["prompt"], "rid": rid, "sampling_params": {
                        "max_new_tokens": body["max_tokens"], "temperature": body["temperature"],
                        **{k: body[k] for k in ("length_target", "length_mode", "beta",
                                                "return_length_values") if k in body}}}
                    th = threading.Thread(target=requests.post, args=(self.url + "/generate",),
                                          kwargs={"json": gen, "timeout": 300})
                    th.start()
                    time.sleep(self.rng.uniform(0, 0.5))
                    requests.post(self.url + "/abort_request", json={"rid": rid}, timeout=60)
                    th.join(timeout=300)
                elif action == "stream":
                    with requests.post(self.url + "/v1/completions", json={**body, "stream": True},
                                       stream=True, timeout=300) as resp:
                        ok = resp.status_code == 200
                        lines = [x for x in resp.iter_lines(decode_unicode=True) if x]
                        ok = ok and lines[-1] == "data: [DONE]"
                        note = "" if ok else f"stream {resp.status_code}: {lines[-1:]}"
                else:
                    resp = requests.post(self.url + "/v1/completions", json=body, timeout=300)
                    out = resp.json()
                    ok = resp.status_code == 200 and out["choices"][0]["finish_reason"] is not None
                    if ok and guided:
                        ok = "length_control" in out["choices"][0]
                    if ok and body.get("length_mode") == "at_most":
                        ok = out["usage"]["completion_tokens"] <= body["length_target"]
                    note = "" if ok else f"{resp.status_code}: {str(out)[:200]}"
            except Exception as e:  # a valid request must not fail in any way
                ok, note = False, repr(e)[:200]
            with self.lock:
                self.records.append({"guided": guided, "action": action, "ok": ok, "note": note,
                                     "latency_s": time.perf_counter() - t})


def run_phase(url, seconds, clients, guided_share, seed):
    records, lock = [], threading.Lock()
    stop_at = time.time() + seconds
    threads = [Client(url, random.Random(seed + i), stop_at, guided_share, records, lock)
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def percentiles(values):
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url")
    ap.add_argument("--server-pid", type=int, help="for the RSS check with --base-url")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--model-path")
    ap.add_argument("--lenvm-path")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--baseline-seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--guided-share", type=float, default=0.5)
    ap.add_argument("--rss-bound-mb", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    server = None
    if args.base_url:
        url, pid = args.base_url, args.server_pid
    else:
        from sglang_lenvm.testing.server_process import Server

        base, lenvm, models_tmp = model_paths(args, ap)  # models_tmp: keep tiny models alive
        server = Server(["--model-path", base, "--lenvm-path", lenvm], Path(tmp.name) / "soak.log",
                        max_total_tokens=65536)
        url, pid = server.url, server.proc.pid
    try:
        run_phase(url, min(10.0, args.seconds / 4), args.clients, args.guided_share, args.seed)
        idle(url)
        rss_start = rss_mb(pid) if pid else None
        baseline = run_phase(url, args.baseline_seconds, args.clients, 0.0, args.seed + 1000)
        mixed = run_phase(url, args.seconds, args.clients, args.guided_share, args.seed + 2000)
        after = idle(url)
        rss_end = rss_mb(pid) if pid else None
        requests.post(url + "/flush_cache?timeout=30", timeout=60)
        flushed = idle(url)
        failures = [r for r in baseline + mixed if not r["ok"]]
        unguided = lambda recs: [r["latency_s"] for r in recs  # noqa: E731
                                 if not r["guided"] and r["action"] == "plain"]
        result = {
            "machine": machine_info(), "settings": vars(args),
            "requests": {"baseline": len(baseline), "mixed": len(mixed),
                         "by_action": {a: sum(r["action"] == a for r in mixed)
                                       for a in ("plain", "stream", "hangup", "abort")}},
            "failed_valid_requests": len(failures), "failure_examples": failures[:5],
            "unguided_latency_s": {"without_guided_load": percentiles(unguided(baseline)),
                                   "with_guided_load": percentiles(unguided(mixed))},
            "rss_mb": {"start": rss_start, "end": rss_end,
                       "growth": None if rss_start is None else rss_end - rss_start},
            "idle_after": after, "idle_after_flush": flushed,
        }
        checks = {
            "no_failed_valid_requests": not failures,
            "rss_growth_within_bound": rss_start is None or
            result["rss_mb"]["growth"] < args.rss_bound_mb,
            "slots_idle": after["idle"],
            "all_slots_free_after_flush": flushed["free_slots"] == flushed["kv_pool_tokens"],
        }
        result["checks"] = checks
        write_json(args.out, result)
        print(json.dumps({k: result[k] for k in ("requests", "failed_valid_requests",
                                                 "unguided_latency_s", "rss_mb", "checks")},
                         indent=2))
        return 0 if all(checks.values()) else 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
