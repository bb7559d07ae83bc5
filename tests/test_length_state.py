"""Per-request length state: built from requests, filtered and merged with the batch."""

from types import SimpleNamespace

import torch

from sglang_lenvm.runtime.length_state import (
    MODE_AT_MOST,
    MODE_EQUAL,
    MODE_NONE,
    PARAMS_KEY,
    LengthState,
    merge_optional,
)


def req(params=None, prompt=5, stops=(), eos=(2,)):
    cp = {PARAMS_KEY: params} if params is not None else None
    sp = SimpleNamespace(custom_params=cp, stop_token_ids=set(stops), ignore_eos=False)
    return SimpleNamespace(sampling_params=sp, origin_input_ids=[0] * prompt,
                           eos_token_ids=set(eos), tokenizer=None)


def build(reqs):
    return LengthState.build(reqs, "cpu", default_top_k=15, max_top_k=64)


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
    merged = merge_optional(f, 2, None, 3, "cpu")
    assert len(merged) == 5 and merged.active == [True, True, False, False, False]
    assert merged.stop_ids.shape == (5, 3)
    both = merge_optional(None, 1, f, 2, "cpu")
    assert both.active == [False, True, True] and both.beta.tolist() == [0.0, 0.0, 1.0]
