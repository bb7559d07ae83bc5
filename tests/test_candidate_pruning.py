"""The scorer leaves candidates under the plausibility floor out of the star forward."""

import types

import torch


def plan(logits, plausibility, stop_id):
    from sglang_lenvm.runtime import scorer
    from sglang_lenvm.schema import MODE_AT_LEAST

    B = logits.shape[0]
    mode = torch.full((B,), MODE_AT_LEAST)
    st = types.SimpleNamespace(
        mode=mode, target=torch.full((B,), 3), prompt_len=torch.full((B,), 4),
        stop_ids=torch.tensor([[stop_id, -1]] * B), top_k=torch.full((B,), 6),
        equal_stop_seq_len=torch.full((B,), 2**40))
    state = types.SimpleNamespace(modes=mode.tolist(), steer=[True] * B, num_candidates=6,
                                  equal_stop_seq_len_cpu=torch.full((B,), 2**40))
    fb = types.SimpleNamespace(forward_mode=types.SimpleNamespace(is_decode=lambda: True),
                               input_ids=torch.full((B,), 1), seq_lens_cpu=torch.full((B,), 10))
    worker = types.SimpleNamespace(
        config=types.SimpleNamespace(repeat_ngram=0, plausibility=plausibility),
        use_kernels=False, sentence_ends=None)
    cand, _ = scorer._plan_candidates(
        worker, logits.clone(), torch.ones(B), st,
        types.SimpleNamespace(top_ps=torch.ones(B), min_ps=torch.zeros(B)), torch.arange(B),
        torch.ones(B, dtype=torch.bool), state, list(range(B)), torch.full((B,), 10), fb)
    return cand


def test_candidates_under_the_floor_are_not_candidates():
    """Row 0: two tokens above 0.1 x the most likely, the stop token (id 9) fourth but under
    the floor; row 1: one token. At floor 0.1 the CPU forward has 2 + 1 non-stop candidates
    (was 6 + 6), the stop token stays a candidate (ending is always possible: past the target
    an at_least row may stop), and the slots past the longest row's last candidate go. At
    floor 0 every top-6 token is a candidate. (The GPU path prunes the same way but keeps the
    slots, invalid: their count would cost a device sync.)"""
    logits = torch.full((2, 12), -9.0)
    logits[0, [3, 4, 5, 9]] = torch.tensor([2.0, 1.5, -1.0, -1.5])
    logits[1, [6, 7, 9]] = torch.tensor([3.0, -1.0, -20.0])  # its stop token: not in the top 6
    cand = plan(logits, 0.1, stop_id=9)
    assert cand.ids.shape[1] == 4  # slot 3 (the stop token, row 0) is the last one used
    assert cand.ids[0].tolist() == [3, 4, 5, 9]
    assert cand.valid.tolist() == [[True, True, False, True], [True, False, False, False]]
    full = plan(logits, 0.0, stop_id=9)
    assert full.ids.shape[1] == 6 and full.valid.all()
