"""The length fields through SGLang's offline Engine API (no HTTP layer, no middleware)."""

import json
import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent('''
    import json, sys
    from sglang_lenvm import engine_api
    from sglang_lenvm.schema import RequestError

    base, lenvm = sys.argv[1], sys.argv[2]
    engine = engine_api.Engine(model_path=base, lenvm_path=lenvm, log_level="error")
    results = {}
    try:
        sp = {"max_new_tokens": 40, "ignore_eos": True, "length_target": 5,
              "length_mode": "at_most", "return_length_values": True}
        out = engine.generate("The sea", sp)
        results["at_most"] = [out["meta_info"]["completion_tokens"],
                              len(out["meta_info"]["lenvm_p"]), "length_target" in sp]
        out = engine.generate("The sea", {"length_target": 6, "length_mode": "at_most",
                                          "ignore_eos": True})
        results["no_limit"] = out["meta_info"]["completion_tokens"]
        batch = engine.generate(["a", "b"], [{"max_new_tokens": 9, "ignore_eos": True},
                                             {"max_new_tokens": 9, "ignore_eos": True,
                                              "length_target": 3, "length_mode": "at_most"}])
        results["batch"] = [o["meta_info"]["completion_tokens"] for o in batch]
        for name, bad in [("field", {"length_target": "5"}),
                          ("private", {"custom_params": {"__lenvm": {"bogus": 1}}}),
                          ("top_k", {"top_k": 2**31}),  # past int32: it stopped the scheduler
                          ("sampling_seed", {"sampling_seed": -2**63 - 1})]:
            try:
                engine.generate("x", {"max_new_tokens": 4, **bad})
                results[name] = None
            except RequestError as e:
                results[name] = e.param
        # ignore_eos: a sampled EOS would end it early (the tiny model's EOS is likely)
        results["after"] = engine.generate("x", {"max_new_tokens": 3, "ignore_eos": True})[
            "meta_info"]["completion_tokens"]
    finally:
        engine.shutdown()
    print("RESULTS " + json.dumps(results))
''')


def test_engine_api_length_fields(models):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(models / "base"),
                        str(models / "lenvm")], capture_output=True, text=True, timeout=600)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULTS ")]
    assert lines, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    res = json.loads(lines[0][8:])
    assert res["at_most"] == [5, 5, True]  # exactly T (ignore_eos), values, caller's dict intact
    assert res["no_limit"] == 6  # the target sets the budget, not SGLang's default of 128
    assert res["batch"] == [9, 3]
    assert res["field"] == "length_target"
    assert res["private"] == "custom_params.__lenvm"
    assert res["top_k"] == "top_k" and res["sampling_seed"] == "sampling_seed"
    assert res["after"] == 3
