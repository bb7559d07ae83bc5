"""generate_data against a small fake OpenAI-compatible server (fast, no model): request
shape, parsing of SGLang- and vLLM-style responses, truncation marking, resuming."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sglang_lenvm import generate_data as gd


class FakeServer:
    """Chat: SGLang-style `response_token_ids`; completions: vLLM-style `token_ids`.
    The length of a completion is len(prompt text) % 7 + 1 + sample counter, capped by
    max_tokens (then finish_reason "length")."""

    def __init__(self, fail_first: int = 0):
        self.requests: list[dict] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "fake-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with threading.Lock():
                    outer.requests.append(body)
                    n = len(outer.requests)
                if n <= outer.fail_first:
                    return self._send(500, {"error": "busy"})
                text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
                want = len(text) % 7 + 1 + n % 3
                L = min(want, body["max_tokens"])
                finish = "stop" if want <= body["max_tokens"] else "length"
                ids = list(range(100, 100 + L - 1)) + ([2] if finish == "stop" else [99])
                usage = {"prompt_tokens": 4, "completion_tokens": L}
                if self.path.endswith("/chat/completions"):
                    choice = {"index": 0, "message": {"role": "assistant", "content": "x" * L},
                              "finish_reason": finish, "prompt_token_ids": [1, 2, 3, 4],
                              "response_token_ids": ids}
                else:
                    choice = {"index": 0, "text": "y" * L, "finish_reason": finish,
                              "token_ids": ids, "prompt_token_ids": [1, 2, 3, 4]}
                self._send(200, {"choices": [choice], "usage": usage})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def fake():
    s = FakeServer()
    yield s
    s.close()


def _prompts(tmp_path, n=4):
    p = tmp_path / "prompts.jsonl"
    rows = []
    for i in range(n):
        if i % 2 == 0:
            rows.append({"id": f"c{i}", "category": "qa",
                         "messages": [{"role": "user", "content": "q" * (i + 1)}]})
        else:
            rows.append({"prompt": "text prompt " + "z" * i})
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _read(path):
    return [json.loads(x) for x in open(path)]


def test_records_and_request_shape(fake, tmp_path):
    out = tmp_path / "out.jsonl"
    gd.main(["--prompts", str(_prompts(tmp_path)), "--output", str(out), "--base-url",
             fake.url, "-n", "3", "--max-tokens", "6", "--concurrency", "4", "--quiet"])
    recs = _read(out)
    assert len(recs) == 12
    assert {(r["prompt_id"], r["sample_index"]) for r in recs} == {
        (pid, i) for pid in ("c0", "1", "c2", "3") for i in range(3)}
    body = fake.requests[0]
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["n"] == 1
    assert body["return_token_ids"] is True and body["model"] == "fake-model"
    assert "top_k" not in body
    chat = [r for r in recs if r["messages"] is not None]
    text = [r for r in recs if r["prompt"] is not None]
    assert len(chat) == 6 and len(text) == 6
    for r in recs:
        assert r["token_ids_source"] == "server"
        assert len(r["completion_token_ids"]) == r["completion_tokens"]
        assert r["prompt_token_ids"] == [1, 2, 3, 4]
        assert r["truncated"] == (r["finish_reason"] == "length")
        assert r["sampling"]["max_tokens"] == 6 and r["sampling"]["temperature"] == 1.0
    assert chat[0]["meta"] == {"category": "qa"}
    assert {r["sampling"]["endpoint"] for r in chat} == {"/chat/completions"}
    assert {r["sampling"]["endpoint"] for r in text} == {"/completions"}
    assert any(r["truncated"] for r in recs)  # some want more than 6 tokens


def test_resume_requests_only_missing(fake, tmp_path):
    prompts, out = _prompts(tmp_path), tmp_path / "out.jsonl"
    args = ["--prompts", str(prompts), "--output", str(out), "--base-url", fake.url,
            "--max-tokens", "50", "--quiet"]
    gd.main(args + ["-n", "2", "--limit", "2"])
    assert len(fake.requests) == 4
    # a torn last line (interrupted write) is dropped and re-requested
    with open(out, "a") as f:
        f.write('{"prompt_id": "1", "sample_ind')
    gd.main(args + ["-n", "3"])
    recs = _read(out)
    assert len(recs) == 12 and len(fake.requests) == 4 + 8
    assert len({(r["prompt_id"], r["sample_index"]) for r in recs}) == 12
    n_before = len(fake.requests)
    gd.main(args + ["-n", "3"])  # everything complete: nothing requested
    assert len(fake.requests) == n_before


def test_retries_then_succeeds(tmp_path):
    s = FakeServer(fail_first=2)
    try:
        out = tmp_path / "o.jsonl"
        gd.main(["--prompts", str(_prompts(tmp_path, 1)), "--output", str(out), "--base-url",
                 s.url + "/v1", "--model", "m", "-n", "1", "--concurrency", "1", "--quiet",
                 "--top-k", "20", "--extra-body", '{"min_p": 0.05}'])
        assert len(_read(out)) == 1
        assert s.requests[-1]["top_k"] == 20 and s.requests[-1]["min_p"] == 0.05
    finally:
        s.close()


def test_bad_prompt_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": [], "prompt": "both"}) + "\n")
    with pytest.raises(ValueError, match="exactly one"):
        gd.load_prompts(str(p))


def test_shuffle_seed_changes_order_not_content(fake, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "x" * i}) + "\n"
                               for i in range(12)))
    out = tmp_path / "o.jsonl"
    gd.main(["--prompts", str(prompts), "--output", str(out), "--base-url", fake.url, "-n", "2",
             "--concurrency", "1", "--shuffle-seed", "0", "--quiet"])
    order = [r["prompt"] for r in fake.requests]
    assert sorted(order) == sorted("x" * i for i in range(12) for _ in range(2))
    assert order != ["x" * i for i in range(12) for _ in range(2)]
    assert order[0] == order[1]  # a prompt's samples are requested together
