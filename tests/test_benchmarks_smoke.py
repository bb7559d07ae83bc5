"""The benchmarks (benchmarks/*.py) run end to end at smoke size against a real server on the
tiny random models, and their definitions (LIFEBench scores, the paper's L_GT, TD scores,
answer extraction, prompt filling) are exact.

The smoke runs share the session's `server` (tests/conftest.py) and assert only that what they
write is well formed: finite numbers in range, JSON with machine and settings, PNG plots.
The tiny models are random, so the numbers themselves mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import (
    bench_serving_ratio,
    decision_frontier,
    latency,
    length_following,
    length_tokens,
    prediction,
    quality,
    tradeoff,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["latency", "length_following", "prediction", "tradeoff", "length_tokens",
           "guided_overhead", "decision_frontier", "bench_serving_ratio"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_output(out: Path, *pngs: str) -> dict:
    data = json.loads(out.read_text())
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["sglang"]
    assert data["settings"] and data["started"]
    for suffix in pngs or (".png",):
        png = out.with_name(out.stem + suffix)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    return data


# ------------------------------------------------------------------------ definitions


@pytest.mark.parametrize("mode,length,score", [
    ("equal", 64, 100.0), ("equal", 32, 100 * math.exp(-2.5)), ("equal", 128, 100 * math.exp(-2)),
    ("at_most", 10, 100.0), ("at_most", 64, 100.0), ("at_most", 96, 100 * math.exp(-1)),
    ("at_least", 200, 100.0), ("at_least", 64, 100.0), ("at_least", 48, 100 * math.exp(-1.25)),
])
def test_lifebench_length_score(mode, length, score):
    ld = length_following.length_deviation(length, 64)
    assert length_following.length_score(mode, ld) == pytest.approx(score)


def test_prompt_filling_lifebench_and_ours():
    en = ("[Instruction] Continue the story.\n\n[Requirement] The continuation must be "
          "{word_count_type} {word_count} words long.")
    cn = "[指令] 回答问题。\n\n[要求]你的回答字数必须{word_count_type} {word_count}字。"
    fill = length_following.fill_task
    lb = length_following.LIFEBENCH_WORDING
    assert fill(en, "en", "equal", 64, lb).endswith("must be equal to 64 tokens long.")
    assert fill(en, "en", "at_most", 8, lb).endswith("must be at most 8 tokens long.")
    assert fill(cn, "cn", "at_least", 32, lb).endswith("你的回答token数必须至少有 32 个token。")
    rows = [json.loads(line) for line in
            (ROOT / "benchmarks/data/length_prompts.jsonl").read_text().splitlines()]
    assert {r["lang"] for r in rows} == {"en", "cn"}
    assert {r["category"] for r in rows} == {"qa", "reasoning", "create"}
    ours = length_following.OUR_WORDING
    first_en = next(r for r in rows if r["lang"] == "en")
    assert fill(first_en["task"], "en", "equal", 16, ours).endswith(
        "Your answer must be exactly 16 tokens.")
    assert all("{" not in fill(r["task"], r["lang"], "at_most", 16, ours) for r in rows)


def test_samples_spread_is_the_per_sample_averages():
    """--samples S: each sample's averages, and mean / sd over the S, from hand-made records."""
    def rec(run, sample, target, length, nll):
        ld = length_following.length_deviation(length, target)
        return {"id": 1, "lang": "en", "category": "qa", "mode": "equal", "target": target,
                "run": run, "sample": sample, "length": length, "finish_reason": "stop",
                "ld": ld, "ls": length_following.length_score("equal", ld), "nll": nll,
                "nll_tokens": [nll] * length, "scored_tokens": length, "off_top3": 0.0,
                "repetitive": sample == 1, "degenerate": False, "abrupt": False}
    records = [rec("baseline", s, t, 3 * t, 1.0 + s) for s in (0, 1) for t in (8, 16)]
    records += [rec("lenvm", s, t, t + s * t // 2, 1.5 + 0.5 * s) for s in (0, 1) for t in (8, 16)]
    args = argparse.Namespace(runs=["baseline", "lenvm"], modes=["equal"], targets=[8, 16],
                              samples=2)
    sp = length_following.summarize(records, args)["samples"]
    ls0 = 100.0
    ls1 = length_following.length_score("equal", length_following.length_deviation(12, 8))
    assert sp["lenvm"]["equal"]["ls"]["values"] == pytest.approx([ls0, ls1])
    assert sp["lenvm"]["equal"]["ls"]["mean"] == pytest.approx((ls0 + ls1) / 2)
    assert sp["lenvm"]["equal"]["ls"]["sd"] == pytest.approx(abs(ls0 - ls1) / 2 ** 0.5)
    assert sp["nll_gap"]["equal"]["values"] == pytest.approx([0.5, 0.0])  # paired by sample
    assert sp["baseline"]["equal"]["repetition"]["values"] == [0.0, 1.0]
    one = argparse.Namespace(runs=["baseline", "lenvm"], modes=["equal"], targets=[8, 16])
    assert length_following.summarize(records, one)["samples"] == {}


def test_l_gt_is_the_return_space_mean():
    gamma = 0.99
    assert prediction.l_gt([50, 50], gamma) == pytest.approx(50)
    lengths = [10, 300]
    gt = prediction.l_gt(lengths, gamma)
    assert 1 - gamma ** gt == pytest.approx(sum(1 - gamma ** n for n in lengths) / 2)
    assert gt < sum(lengths) / 2  # Jensen: L_GT is below the mean length


def test_td_scores_end_with_a_terminal_state():
    gamma = 0.9
    choice = {"finish_reason": "stop", "length_control": {"values": [0.5, 0.4]},
              "logprobs": {"content": [{"token": "a"}, {"token": "<eos>"}]}}
    scores = length_tokens.token_scores(choice, gamma)
    assert [t for t, _ in scores] == ["a", "<eos>"]
    assert scores[0][1] == pytest.approx(gamma * 0.4 - 0.5 + 0.1)
    assert scores[1][1] == pytest.approx(0.0 - 0.4 + 0.1)  # p after EOS is 0
    cut = {**choice, "finish_reason": "length"}
    assert len(length_tokens.token_scores(cut, gamma)) == 1  # no value after the last token
    # A trace that stopped (a fault) is scored up to its first missing value only.
    stopped = {**choice, "length_control": {"values": [0.5, 0.4, None]},
               "logprobs": {"content": [{"token": "a"}, {"token": "b"}, {"token": "c"}]}}
    assert [t for t, _ in length_tokens.token_scores(stopped, gamma)] == ["a"]


def test_arithmetic_problems_and_answer_extraction():
    problems = tradeoff.make_problems(60, seed=1)
    assert problems == tradeoff.make_problems(60, seed=1)  # deterministic
    assert len({p["question"] for p in problems}) == 60
    easy = tradeoff.make_problems(30, seed=1, level="easy")
    assert len({p["question"] for p in easy}) > 20
    assert all(isinstance(p["answer"], int) and p["answer"] >= 0 for p in problems + easy)
    ex = tradeoff.extract_answer
    assert ex("3 + 4 = 7, so \\boxed{1,234}.") == (1234.0, "boxed")
    assert ex("\\boxed{5} no wait \\boxed{$12$ apples}") == (12.0, "boxed")
    assert ex("It is 12, or maybe 13.") == (13.0, "last_number")
    assert ex("I do not know") == (None, "none")


# ------------------------------------------------------------------------ smoke runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_latency_smoke(server, models, tmp_path):
    out = tmp_path / "latency.json"
    # Plain SGLang is started by the benchmark itself (--plain-model-path), the LenVM server
    # is the shared one.
    r = latency.main(["--base-url", server.url, "--plain-model-path", str(models / "base"),
                      "--max-total-tokens", "16384", "--concurrency", "1", "2", "--ks", "3",
                      "--tokens", "6", "--rounds", "1", "--warmup-tokens", "2",
                      "--max-position", "8", "--position-step", "4", "--window", "2",
                      "--out", str(out)])
    data = check_output(out)
    assert data["levels"] == r["levels"]
    assert set(data["levels"]) == {"unguided", "guided_k3", "plain_sglang"}
    for by_c in data["levels"].values():
        assert set(by_c) == {"1", "2"}
        for level in by_c.values():
            assert level["tokens"] == 6 * level["requests"]  # every request ran to --tokens
            assert finite(level["output_tok_s"]) and level["output_tok_s"] > 0
            assert finite(level["ttft_s"]["mean"]) and level["ttft_s"]["mean"] > 0
            assert finite(level["itl_s"]["mean"]) and level["itl_s"]["mean"] > 0
    for curve in data["per_position_s"].values():
        assert list(curve) == ["4", "8"] and all(finite(v) and v > 0 for v in curve.values())
    for by_pair in data["ratios"].values():
        assert set(by_pair) == {"guided_k3_vs_unguided", "unguided_vs_plain_sglang"}
        assert all(finite(v["output_tok_s"]) and v["output_tok_s"] > 0 for v in by_pair.values())
    assert data["plain_server"]["model"] and data["server"]["lenvm"]["gamma"]
    work = data["lenvm_stats_after_run"]
    assert work["candidates_scored"] > 0 and work["star_tokens"] > work["candidates_scored"]


def test_bench_serving_ratio_smoke(server, tmp_path):
    """SGLang's own load generator against the shared server: every request runs to its length,
    and the server's counters show the guided run scored K candidates per token and the
    unguided run none."""
    out = tmp_path / "bench_serving.json"
    bench_serving_ratio.main(["--base-url", server.url, "--num-prompts", "3", "--concurrency",
                              "2", "--ks", "3", "--input-len", "8", "--output-len", "5",
                              "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"]["sglang"] and data["settings"]["ks"] == [3]
    (scoring, levels), = data["scorings"].items()
    assert scoring == "star" and set(levels) == {"2"}
    lv = levels["2"]
    for run in ("unguided", "guided_k3"):
        assert lv[run]["completed"] == 3 and lv[run]["total_output_tokens"] == 15
        assert finite(lv[run]["output_throughput"]) and lv[run]["output_throughput"] > 0
        assert "--dataset-name random-ids" in lv[run]["command"]
    assert lv["unguided"]["candidates_scored"] == 0
    assert lv["guided_k3"]["candidates_scored"] == 3 * 5 * 3
    assert lv["ratio_k3"] == pytest.approx(lv["guided_k3"]["output_throughput"]
                                           / lv["unguided"]["output_throughput"])


def test_guided_overhead_smoke(models, tmp_path):
    """Starts its own servers (ours with --enable-metrics, then plain SGLang): step times from
    the scheduler's log, the LenVM's share from its Prometheus histogram."""
    from benchmarks import guided_overhead

    out = tmp_path / "go.json"
    r = guided_overhead.main(["--model-path", str(models / "base"), "--lenvm-path",
                              str(models / "lenvm"), "--positions", "4", "8", "--window", "3",
                              "--decode-log-interval", "1", "--concurrency", "2", "--tokens",
                              "6", "--repeats", "1", "--rounds", "1", "--ks", "3",
                              "--max-total-tokens", "16384", "--out", str(out)])
    data = json.loads(out.read_text())  # a table, no plot
    assert data["machine"]["cpu_count"] >= 1 and data["settings"] and data["started"]
    assert set(data["step_s"]) == {"unguided", "guided_k3"}
    for name, v in data["step_s"].items():
        assert finite(v["4"]) and finite(v["8"]) and v["4"] > 0, name
    guided, unguided = data["step_s"]["guided_k3"], data["step_s"]["unguided"]
    assert guided["lenvm_scored_steps"] >= 8 and finite(guided["lenvm_scoring_s_per_step"])
    assert unguided["lenvm_scored_steps"] == 0  # unguided requests cost the LenVM nothing
    assert all(finite(v) and v > 0 for v in data["ratios"].values())
    assert r["ratios"] == data["ratios"]


def test_length_following_smoke(server, tmp_path):
    out = tmp_path / "lf.json"
    length_following.main(["--base-url", server.url, "--limit", "2", "--targets", "4",
                           "--max-tokens-factor", "2", "--concurrency", "8", "--out", str(out)])
    data = check_output(out, ".png", "_lengths.png")
    assert not data["errors"]
    assert len(data["records"]) == 2 * 3 * 1 * 2  # prompts x modes x targets x runs
    for r in data["records"]:
        assert r["length"] >= 1 and finite(r["ld"]) and 0 <= r["ls"] <= 100
        assert (r["predicted_length"] is not None) == (r["run"] == "lenvm")
    s = data["summary"]
    for run in ("baseline", "lenvm"):
        for mode in ("equal", "at_most", "at_least"):
            for c in s["cells"][run][mode].values():
                assert c["n"] + c["dropped"] == 2
                if c["n"]:
                    assert 0 <= c["ls"] <= 100 and c["deviation"] >= 0
    for r in data["records"]:  # quality beside every length
        assert finite(r["nll"]) and r["nll"] > 0 and 0 <= r["off_top3"] <= 1
        assert r["scored_tokens"] == r["length"] and isinstance(r["repetitive"], bool)
    for run in ("baseline", "lenvm"):
        for avg in s["averages"][run].values():
            assert finite(avg["nll"]) and 0 <= avg["repetition"] <= 1
    assert set(s["nll_gap"]) == {"equal", "at_most", "at_least"}
    # The guarantees of at_most / at_least hold whatever the LenVM (the tiny one is random).
    assert all(c["ls"] == 100 for c in s["cells"]["lenvm"]["at_most"].values() if c["n"])
    assert all(c["ls"] == 100 for c in s["cells"]["lenvm"]["at_least"].values() if c["n"])


def test_length_following_reads_lifebench_format(server, tmp_path):
    rows = [{"id": 1, "category": "qa", "type": "Knowledge", "lang": "en",
             "task": "[Instruction] Why is the sea salty?\n\n[Requirement] Your response must "
                     "be {word_count_type} {word_count} words long.",
             "raw_data": "Why is the sea salty?"},
            {"id": 2, "category": "reasoning", "type": "Deductive", "lang": "cn",
             "task": "[指令] 谁说了真话？\n\n[要求] 你的推理字数必须{word_count_type} {word_count}字。",
             "raw_data": "谁说了真话？"}]
    path = tmp_path / "lifebench.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    out = tmp_path / "lb.json"
    length_following.main(["--base-url", server.url, "--lifebench", str(path), "--targets",
                           "4", "--modes", "equal", "--max-tokens-factor", "2", "--out", str(out)])
    data = check_output(out)
    assert data["prompt_set"] == str(path) and len(data["records"]) == 4
    assert {r["lang"] for r in data["records"]} == {"en", "cn"}


def test_repetition_units_and_rule():
    assert quality.units("The sea, the SEA!") == ["the", "sea", "the", "sea"]
    assert quality.units("大海很大") == ["大", "海", "很", "大"]
    assert quality.repetitive("a b c a b c a b c") and not quality.repetitive("a b c a b c")
    assert quality.repetitive("我爱你。我爱你。我爱你。")
    assert not quality.repetitive("one two three four five six seven eight nine")
    loop = "an island paradise made " + "made " * 12 + "found made made made."
    assert quality.degenerate(loop) and quality.repetitive(loop)
    reuse = ("Count the number of chickens, then the number of cows: the number of chickens "
             "is thirty minus the number of cows, and each cow has four legs.")
    assert quality.repetitive(reuse) and not quality.degenerate(reuse)
    assert not quality.degenerate("made made made")  # too short to call


def test_abrupt_end_is_a_stop_token_the_base_model_did_not_expect():
    assert quality.abrupt([1.0, 2.0, 5.0], "stop")  # 5 nats > ln 100: under 1%
    assert not quality.abrupt([1.0, 9.0, 4.0], "stop")  # only the final (stop) token counts
    assert not quality.abrupt([1.0, 2.0, 9.0], "length")  # cut by max_tokens: no stop token
    assert not quality.abrupt([], "stop")
    summary = quality.summarize([
        {"nll": 1.0, "scored_tokens": 2, "off_top3": 0.0, "repetitive": False,
         "degenerate": False, "nll_tokens": [1.0, 9.0], "target": 2, "finish_reason": "stop"},
        {"nll": 1.0, "scored_tokens": 2, "off_top3": 0.0, "repetitive": False,
         "degenerate": False, "abrupt": False, "nll_tokens": [1.0, 1.0], "target": 2}])
    assert summary["abrupt"] == 0.5  # the first recomputed from its tokens (an older record)


@pytest.mark.parametrize("text,rule", [
    ("0.1:16", (0.1, 16.0, 0.0, math.inf)),
    ("0.1:inf:1", (0.1, math.inf, 1.0, math.inf)),
    ("0:16:1:2", (0.0, 16.0, 1.0, 2.0)),
])
def test_frontier_rule_spec(text, rule):
    assert decision_frontier.parse_rule(text) == rule


@pytest.mark.parametrize("text", ["0.1", "0.1:2:3:4:5", "a:b"])
def test_frontier_rule_spec_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="ALPHA:LAMBDA"):
        decision_frontier.parse_rule(text)


def test_decision_frontier_smoke(server, tmp_path):
    out = tmp_path / "df.json"
    decision_frontier.main(["--base-url", server.url, "--limit", "2", "--targets", "4",
                            "--modes", "equal", "at_least", "--max-tokens-factor", "2",
                            "--out", str(out)])
    data = check_output(out)
    (rule,) = data["rules"]
    lenvm = rule["server"]["lenvm"]  # the server's own rule, as it reports it
    assert rule["alpha"] == lenvm["plausibility"] and rule["lambda"] == lenvm["equal_softness"]
    assert rule["nu"] == lenvm["at_most_softness"]
    for mode in ("equal", "at_least"):
        avg = rule["summary"]["averages"]["lenvm"][mode]
        assert 0 <= avg["ls"] <= 100 and finite(avg["nll"])
        assert finite(data["baseline"][mode]["nll"])
    # --append adds a point to the same sweep, keeping its baseline; other settings are refused
    args = ["--base-url", server.url, "--limit", "2", "--targets", "4", "--modes", "equal",
            "at_least", "--out", str(out), "--append"]
    decision_frontier.main([*args, "--max-tokens-factor", "2"])
    again = json.loads(out.read_text())
    assert len(again["rules"]) == 2 and again["baseline"] == data["baseline"]
    assert len(again["appended"]) == 1
    with pytest.raises(SystemExit, match="other settings"):
        decision_frontier.main([*args, "--max-tokens-factor", "3"])
    other = tmp_path / "other_prompts.jsonl"
    other.write_text((ROOT / "benchmarks/data/length_prompts.jsonl").read_text())
    with pytest.raises(SystemExit, match="prompt set"):
        decision_frontier.main([*args, "--max-tokens-factor", "2", "--prompts", str(other)])


def test_prediction_smoke(server, tmp_path):
    out = tmp_path / "pred.json"
    prediction.main(["--base-url", server.url, "--limit", "3", "--n", "2", "--max-tokens", "16",
                     "--out", str(out)])
    data = check_output(out)
    assert 0 < data["gamma"] < 1
    for p in data["per_prompt"]:
        assert len(p["lengths"]) == 2 and all(1 <= n <= 16 for n in p["lengths"])
        assert 0 < p["l_gt"] <= p["mean_length"] + 1e-9
        assert finite(p["predicted_length"]) and p["predicted_length"] >= 0
        assert 0 <= p["p0"] <= 1
    o = data["overall"]
    assert o["prompts"] == 3 and o["samples"] == 6
    assert finite(o["mre_l_gt"]) and o["mre_l_gt"] >= 0
    assert finite(o["mre_mean_length"]) and o["mre_mean_length"] >= 0


def test_tradeoff_smoke(server, tmp_path):
    out = tmp_path / "tradeoff.json"
    tradeoff.main(["--base-url", server.url, "--problems", "2", "--n", "2", "--betas", "0",
                   "-50", "--budgets", "4", "8", "32", "--max-tokens", "16", "--out", str(out)])
    data = check_output(out)
    assert set(data["beta"]) == {"0", "-50"} and set(data["budget"]) == {"4", "8"}
    for name, pt in [*data["beta"].items(), *data["budget"].items()]:
        assert pt["n"] == 4 and 0 <= pt["accuracy"] <= 1, name
        assert 1 <= pt["mean_truncated_length"] <= 16, name
    assert data["budget"]["4"]["mean_truncated_length"] <= 4
    assert len(data["samples"]) == 8 and len(data["problems"]) == 2
    # What the text cost, beside length: per sample, and per row (a budget's NLL is its cut's).
    for smp in data["samples"]:
        assert finite(smp["nll"]) and smp["scored_tokens"] == smp["length"]
        assert isinstance(smp["repetitive"], bool)
    for pt in data["beta"].values():
        assert finite(pt["nll"]) and 0 <= pt["repetition"] <= 1 and 0 <= pt["off_top3"] <= 1
    plain = [smp for smp in data["samples"] if smp["beta"] == 0]
    cut4 = [sum(smp["nll_tokens"][:4]) / len(smp["nll_tokens"][:4]) for smp in plain]
    assert data["budget"]["4"]["nll"] == pytest.approx(sum(cut4) / len(cut4), abs=1e-6)


def test_length_tokens_smoke(server, tmp_path):
    out = tmp_path / "lt.json"
    length_tokens.main(["--base-url", server.url, "--limit", "2", "--n", "2", "--max-tokens",
                        "16", "--min-count", "1", "--top", "5", "--out", str(out)])
    data = check_output(out)
    assert data["n_samples"] == 4 and data["n_scored_tokens"] >= 1
    assert data["trace_stopped"] == 0  # no LenVM fault on plain value-only requests
    t = data["tokens"]
    assert t["lengthening"] or t["shortening"]
    assert all(x["mean"] > 0 and x["count"] >= 1 for x in t["lengthening"])
    assert all(x["mean"] < 0 for x in t["shortening"])
    # |s_t| <= 1 + (1 - gamma): p is in [0, 1]
    for x in t["lengthening"] + t["shortening"]:
        assert finite(x["mean"]) and abs(x["mean"]) <= 2
