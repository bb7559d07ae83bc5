"""End to end on a tiny random model: our server samples (generate_data) -> train a few steps on
CPU -> our server loads the result with --lenvm-path -> guided requests work, and the served
prompt-boundary value equals the trained model's own (so what is trained is what is served)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sglang_lenvm.testing.server_process import Server

PROMPTS = ["Tell me about the sea", "Write a story", "Count to ten", "What is two plus two?",
           "Describe a cat", "Explain gravity"]


@pytest.mark.timeout(900)
def test_generate_train_serve(server, models, tmp_path):
    from sglang_lenvm import generate_data, train
    from sglang_lenvm.training.model import LenVMForTraining

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": t}]}) + "\n"
        for i, t in enumerate(PROMPTS)))
    data = tmp_path / "samples.jsonl"
    generate_data.main(["--prompts", str(prompts), "--output", str(data), "--base-url",
                        server.url, "-n", "3", "--max-tokens", "24", "--concurrency", "8",
                        "--quiet"])
    recs = [json.loads(x) for x in open(data)]
    assert len(recs) == 18
    for r in recs:
        assert r["token_ids_source"] == "server"
        assert len(r["completion_token_ids"]) == r["completion_tokens"] <= 24
        assert r["truncated"] == (r["finish_reason"] == "length")

    # A random tiny model seldom emits EOS within 24 tokens, so most samples are cut by
    # max_tokens; include them here (a real run skips them) so there is data to train on.
    out = tmp_path / "lenvm"
    summary = train.main(["--base", str(models / "base"), "--data", str(data), "--output",
                          str(out), "--include-truncated", "--epochs", "2", "--max-steps", "3",
                          "--batch-size", "4", "--grad-accum", "2", "--train-last-layers", "1",
                          "--cache-frozen", "--val-fraction", "0.34", "--no-progress"])
    assert summary["history"] and math.isfinite(summary["history"][-1]["train_loss"])
    gamma = summary["gamma"]
    assert json.loads((out / "config.json").read_text())["lenvm_gamma"] == gamma

    # The trained model's own value at the prompt boundary of the first prompt.
    first = recs[0]
    model = LenVMForTraining.from_base(str(models / "base"))
    from safetensors.torch import load_file

    backbone = {k[len("model."):]: v for k, v in load_file(str(out / "model.safetensors")).items()}
    model.backbone.load_state_dict(backbone, strict=False)
    model.v_head.load_state_dict({k[len("v_head."):]: v for k, v in
                                  load_file(str(out / "value_head.safetensors")).items()})
    with torch.no_grad():
        z = model(torch.tensor([first["prompt_token_ids"]]))[0, -1]
    p_trained = float(torch.sigmoid(z))

    s = Server(["--model-path", str(models / "base"), "--lenvm-path", str(out)],
               tmp_path / "trained_server.log")
    try:
        pred = s.post("/v1/length/predict", {"messages": first["messages"]}).json()
        assert pred["gamma"] == pytest.approx(gamma)  # read from config.json
        assert pred["prompt_tokens"] == len(first["prompt_token_ids"])
        assert pred["value"] == pytest.approx(p_trained, abs=2e-4)
        r = s.post("/v1/chat/completions", {
            "model": "m", "messages": first["messages"], "max_tokens": 24, "length_target": 6,
            "length_mode": "equal", "return_length_values": True})
        assert r.status_code == 200, r.text
        lc = r.json()["choices"][0]["length_control"]
        assert lc["length_target"] == 6 and lc["length_mode"] == "equal"
        assert lc["predicted_length"] > 0 and "warning" not in lc
        assert len(lc["values"]) == r.json()["usage"]["completion_tokens"]
        assert lc["values"][0] == pytest.approx(p_trained, abs=2e-4)
    finally:
        s.stop()
