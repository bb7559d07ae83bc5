"""Per-request length state: built from requests, filtered and merged with the batch."""

from types import SimpleNamespace

import torch

from sglang_lenvm.runtime.length_state import LengthState, Settings, merge_optional
from sglang_lenvm.schema import MODE_AT_MOST, MODE_EQUAL, MODE_NONE, NEVER, LengthParams, equal_stop_length

SETTINGS = Settings("cpu", default_top_k=15, max_top_k=64)


def req(params=None, prompt=5, stops=(), eos=(2,), rid="r"):
    """A request as admission leaves it (lenvm_params parsed from the private form)."""
    sp = SimpleNamespace(stop_token_ids=set(stops), ignore_eos=False)
    lp = LengthParams.from_wire(params, max_top_k=64) if params is not None else None
    return SimpleNamespace(sampling_params=sp, origin_input_ids=[0] * prompt,
                           eos_token_ids=set(eos), tokenizer=None, lenvm_params=lp, rid=rid,
                           output_ids=[], customized_info=None)


def build(reqs, settings=SETTINGS):
    return LengthState.build(reqs, settings)


def test_no_lenvm_request_builds_nothing():
    assert build([req(), req({"beta": 0.0})]) is None


def test_build_rows():
    s = build([
        req({"target": 10, "mode": "equal"}, prompt=3, stops=(7,)),
        req(),
        req({"return_values": True}),
        req({"target": 4, "mode": "at_most", "beta": -2.0, "top_k": 5}),
    ])
    assert s.active == [True, False, True, True]
    assert s.steer == [True, False, False, True]
    assert s.want_values == [False, False, True, False]
    assert s.num_candidates == 15
    assert s.mode.tolist() == [MODE_EQUAL, MODE_NONE, MODE_NONE, MODE_AT_MOST]
    assert s.target.tolist() == [10, 0, 0, 4]
    assert s.top_k.tolist() == [15, 0, 0, 5]
    assert s.prompt_len.tolist() == [3, 5, 5, 5]
    assert s.beta.tolist() == [0.0, 0.0, 0.0, -2.0]
    assert s.stop_ids[0].tolist() == [2, 7]
    assert s.stop_ids[1].tolist() == [-1, -1]  # rows that do not use the LenVM carry no stops


def test_filter_and_merge():
    a = build([req({"target": 10, "mode": "equal"}), req(), req({"beta": 1.0}, stops=(8, 9))])
    keep = [0, 2]
    f = a.filter(keep, torch.tensor(keep))
    assert f.active == [True, True] and f.target.tolist() == [10, 0]
    assert a.filter([1], torch.tensor([1])) is None  # no LenVM row left
    merged = merge_optional(f, f.reqs, None, [req()] * 3, SETTINGS)
    assert len(merged) == 5 and merged.active == [True, True, False, False, False]
    assert merged.stop_ids.shape == (5, 3)
    both = merge_optional(None, [req()], f, f.reqs, SETTINGS)
    assert both.active == [False, True, True] and both.beta.tolist() == [0.0, 0.0, 1.0]


def test_equal_stop_length():
    assert equal_stop_length(128, 0.25) == 160
    assert equal_stop_length(10, 0.1) == 11  # not 12: (1 + 0.1) * 10 is 11.000000000000002
    assert equal_stop_length(7, 0.25) == 9  # ceil(8.75)
    assert equal_stop_length(7, 0.0) == 7
    assert equal_stop_length(7, float("inf")) == NEVER


def test_equal_stop_seq_len_follows_the_rows():
    a = build([req({"target": 8, "mode": "equal"}, prompt=3), req(),
               req({"target": 8, "mode": "at_most"}),
               req({"target": 20, "mode": "equal"}, prompt=4)],
              Settings("cpu", 15, 64, equal_max_overshoot=0.25))
    # output length 10 (prompt 3) is reached by the token generated at sequence length 12
    expected = [3 + 10 - 1, NEVER, NEVER, 4 + 25 - 1]
    assert a.equal_stop_seq_len.tolist() == expected
    assert a.equal_stop_seq_len_cpu.tolist() == expected
    assert a.equal_stop_seq_len_cpu.device.type == "cpu"
    f = a.filter([0, 3], torch.tensor([0, 3]))
    assert f.equal_stop_seq_len.tolist() == f.equal_stop_seq_len_cpu.tolist() == [12, 28]
    assert f.rows(torch.tensor([1])).equal_stop_seq_len.tolist() == [28]
    m = merge_optional(f, f.reqs, None, [req()], SETTINGS)
    assert m.equal_stop_seq_len_cpu.tolist() == [12, 28, NEVER]
    off = build([req({"target": 8, "mode": "equal"})],
                Settings("cpu", 15, 64, equal_max_overshoot=float("inf")))
    assert off.equal_stop_seq_len_cpu.tolist() == [NEVER]
