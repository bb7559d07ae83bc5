"""Length guidance end to end, with a LenVM whose value is a known function of the prefix.

The oracle LenVM (tiny_models.build_oracle_lenvm) predicts, after the i-th letter, exactly
i + 1 remaining tokens, and 0 after EOS. The character vocabulary is small enough that every
token is a candidate (--lenvm-top-k 48), so the decision rules can be checked exactly.
"""

from concurrent.futures import ThreadPoolExecutor
from statistics import mean

import pytest

from reference import trace_reference

EOS = 2


def gen(server, text="abc", **sp):
    r = server.post("/generate", {"text": text, "sampling_params": sp})
    assert r.status_code == 200, r.text
    return r.json()


def gen_many(server, n, text="abc", **sp):
    """n concurrent requests (SGLang batches them)."""
    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda _: gen(server, text, **sp), range(n)))


@pytest.mark.parametrize("target", [1, 2, 7, 20, 40])
def test_equal_hits_the_target_exactly(oracle_server, target):
    outs = [gen(oracle_server, max_new_tokens=80, temperature=0.0, length_target=target)]
    outs += gen_many(oracle_server, 3, max_new_tokens=80, temperature=1.0,
                     length_target=target, length_mode="equal")
    for out in outs:
        assert len(out["output_ids"]) == target
        assert out["output_ids"][-1] == EOS and out["meta_info"]["finish_reason"]["type"] == "stop"


def test_equal_samples_at_temperature_and_is_deterministic_at_zero(oracle_server):
    """The soft equal rule (default --lenvm-equal-softness 16): n choices differ at temperature
    1, each still exactly on target; at temperature 0 repeated requests agree."""
    outs = gen(oracle_server, max_new_tokens=60, temperature=1.0, n=4, length_target=20)
    assert len(outs) == 4 and all(len(o["output_ids"]) == 20 for o in outs)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1
    greedy = [gen(oracle_server, max_new_tokens=60, temperature=0.0, length_target=20)
              for _ in range(2)]
    assert greedy[0]["output_ids"] == greedy[1]["output_ids"]
    assert len(greedy[0]["output_ids"]) == 20


@pytest.mark.parametrize("target", [4, 8, 20])
def test_equal_ends_by_its_overshoot_limit(oracle_server, target):
    """With the stop token biased out of every candidate set, `equal` cannot end near the
    target by choice; the server's default --lenvm-equal-max-overshoot 0.25 ends it at
    ceil(1.25 x target) tokens, stop token included, instead of at max_new_tokens."""
    limit = -(-5 * target // 4)
    for out in gen_many(oracle_server, 3, max_new_tokens=80, temperature=1.0, top_p=0.9,
                        logit_bias={str(EOS): -30.0}, length_target=target, length_mode="equal"):
        assert len(out["output_ids"]) == limit
        assert out["output_ids"][-1] == EOS and out["meta_info"]["finish_reason"]["type"] == "stop"
    # the same request unguided never stops by itself within max_new_tokens
    plain = gen(oracle_server, max_new_tokens=80, temperature=1.0, top_p=0.9,
                logit_bias={str(EOS): -30.0})
    assert len(plain["output_ids"]) == 80 and EOS not in plain["output_ids"]


@pytest.mark.parametrize("target", [1, 3, 10, 30])
def test_at_most_never_exceeds(oracle_server, target):
    for out in gen_many(oracle_server, 6, max_new_tokens=80, temperature=1.0,
                        length_target=target, length_mode="at_most"):
        assert len(out["output_ids"]) <= target
        assert out["output_ids"][-1] == EOS  # ends by choice, not by the length cap


@pytest.mark.parametrize("target", [2, 10, 30])
def test_at_least_never_stops_before(oracle_server, target):
    for out in gen_many(oracle_server, 6, max_new_tokens=60, temperature=1.0,
                        length_target=target, length_mode="at_least"):
        n = len(out["output_ids"])
        assert n >= target
        assert EOS not in out["output_ids"][:target - 1]


def test_beta_shifts_mean_length_monotonically(oracle_server):
    def mean_len(beta):
        outs = gen_many(oracle_server, 24, max_new_tokens=60, temperature=1.0, beta=beta)
        return mean(len(o["output_ids"]) for o in outs)

    lengths = [mean_len(b) for b in (-30.0, 0.0, 30.0)]
    assert lengths[0] < lengths[1] < lengths[2], lengths


def test_beta_zero_without_mode_is_exactly_unguided(oracle_server):
    plain = gen(oracle_server, max_new_tokens=30, temperature=0)
    zero = gen(oracle_server, max_new_tokens=30, temperature=0, beta=0.0)
    assert plain["output_ids"] == zero["output_ids"]
    assert "lenvm_p" not in zero["meta_info"]


def test_mixed_batch_leaves_unguided_requests_untouched(oracle_server):
    prompts = ["abc", "xyzzy", "hello", "ABCdef"]
    alone = [gen(oracle_server, p, max_new_tokens=25, temperature=0)["output_ids"]
             for p in prompts]
    guided = [dict(length_target=5), dict(length_target=9, length_mode="at_most"),
              dict(length_target=12, length_mode="at_least"), dict(beta=-10.0),
              dict(return_length_values=True)]
    jobs = [(p, {}) for p in prompts] + [("abc", g) for g in guided] * 2
    with ThreadPoolExecutor(len(jobs)) as ex:
        outs = list(ex.map(lambda j: gen(oracle_server, j[0], max_new_tokens=25,
                                         temperature=0 if not j[1] else 1.0, **j[1]), jobs))
    for i, p in enumerate(prompts):
        assert outs[i]["output_ids"] == alone[i], p
    for (_, g), out in zip(jobs[len(prompts):], outs[len(prompts):]):
        if "length_target" in g and g.get("length_mode", "equal") == "equal":
            assert len(out["output_ids"]) == g["length_target"]


def test_oracle_values_match_reference(oracle_server, models):
    """The shards head placement, through SGLang, equals transformers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models / "cbase"))
    out = gen(oracle_server, "abcdef", max_new_tokens=20, temperature=1.0,
              return_length_values=True)
    ref = trace_reference(models / "oracle", tok.encode("abcdef"), out["output_ids"])
    got = out["meta_info"]["lenvm_p"]
    assert max(abs(g - r) for g, r in zip(got, ref.tolist())) < 1e-4
