"""Which tokens end a sentence (runtime/sentence_end.py), and the scorer's stop slot after one."""

import types

import pytest
import torch
from test_repeat_guard import ByteLevel

from sglang_lenvm.runtime import sentence_end, token_text

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text,ends", [
    (".", True), ("!", True), (" ?", True), (".\n\n", True), ('."', True), ("\u3002", True),
    ("\uff1f\u300d", True), ("...", True), (")**.", True), ("**.", True),
    (",", False), (" the", False), ("\n", False), ("", False), (" ", False), ("\ufffd", False),
    (".\ufffd", False), ("Mr", False), ("3", False),
])
def test_ends_sentence(text, ends):
    assert sentence_end.ends_sentence(text) is ends


class Punctuated(ByteLevel):
    WORDS = ByteLevel.WORDS + ["\u0120end.", ".\u010a\u010a", "\u0120\u0120", "\u3002"]


def test_table_of_a_byte_level_tokenizer():
    tok = Punctuated()
    table = sentence_end.sentence_ends(tok, len(tok) + 3, "cpu")
    word = {w: 256 + i for i, w in enumerate(Punctuated.WORDS)}
    assert table.shape == (len(tok) + 3,) and table.dtype == torch.bool
    assert table[ord(".")] and table[ord("!")] and table[ord("?")]
    assert table[word["\u0120end."]] and table[word[".\u010a\u010a"]]
    assert table[word["\u3002"]]  # 。 stored as its UTF-8 bytes
    assert not table[ord(",")] and not table[word["\u0120the"]] and not table[word["\u010a"]]
    assert not table[word["\uff0c"]]  # ，
    assert not table[0x80:256].any()  # parts of characters
    assert not table[len(tok):].any()  # padding rows past the tokenizer
    assert not sentence_end.sentence_ends(None, 10, "cpu").any()


def test_token_texts_reads_bytes_and_decodes_the_rest():
    class Words:
        def __len__(self):
            return 3

        def convert_ids_to_tokens(self, ids):
            return ["<|im_end|>", "\u2581Hi", None][: len(ids)]

        def decode(self, ids):
            if ids == [2]:
                raise ValueError("no such id")
            return {0: "<|im_end|>", 1: " Hi"}[ids[0]]

    # ASCII pieces read as bytes (GPT-2's alphabet keeps printable ASCII as is); the others
    # through decode; an id decode refuses is unreadable
    assert token_text.token_texts(Words(), 3) == [("<|im_end|>", b"<|im_end|>"),
                                                 (" Hi", None), (None, None)]
    assert token_text.token_texts(ByteLevel(), 257)[ord("a")] == ("a", b"a")


def test_equal_and_past_target_at_least_rows_may_stop_right_after_a_sentence_end():
    """scorer._plan_candidates: in a decode step, equal rows and at_least rows past their
    target whose input token (the output's last) ends a sentence get their stop token as one
    more candidate even when truncation dropped it; other rows (not after a sentence end,
    at_least before its target) do not; candidates carry `closes`. With the rule off (no
    table) nothing changes."""
    from sglang_lenvm.runtime import scorer
    from sglang_lenvm.schema import MODE_AT_LEAST, MODE_EQUAL

    V, EOS, DOT = 12, 0, 5
    B = 5
    logits = torch.zeros(B, V)
    logits[:, EOS] = -12.0  # outside a top-4 candidate set, probability > 0
    logits[:, DOT] = 1.0
    table = torch.zeros(V, dtype=torch.bool)
    table[DOT] = True
    # rows: equal after a full stop, equal mid-sentence, at_least before its target after a
    # full stop, at_least past it after one (6 generated, target 7: this token is the 7th) and
    # past it mid-sentence
    mode = torch.tensor([MODE_EQUAL, MODE_EQUAL, MODE_AT_LEAST, MODE_AT_LEAST, MODE_AT_LEAST])
    st = types.SimpleNamespace(
        mode=mode, target=torch.tensor([20, 20, 20, 7, 7]), prompt_len=torch.tensor([4] * B),
        stop_ids=torch.tensor([[EOS, -1]] * B), top_k=torch.tensor([4] * B),
        equal_stop_seq_len=torch.tensor([99, 99, 2**40, 2**40, 2**40]))
    state = types.SimpleNamespace(modes=mode.tolist(), steer=[True] * B, num_candidates=4,
                                  equal_stop_seq_len_cpu=st.equal_stop_seq_len)
    decode = types.SimpleNamespace(is_decode=lambda: True)
    fb = types.SimpleNamespace(forward_mode=decode, input_ids=torch.tensor([DOT, 7, DOT, DOT, 7]),
                               seq_lens_cpu=torch.tensor([10] * B))
    sampling = types.SimpleNamespace(top_ps=torch.ones(B), min_ps=torch.zeros(B))

    def plan(ends):
        worker = types.SimpleNamespace(config=types.SimpleNamespace(repeat_ngram=0, plausibility=0.1),
                                       use_kernels=False, sentence_ends=ends)
        cand, must = scorer._plan_candidates(
            worker, logits.clone(), torch.ones(B), st, sampling, torch.arange(B),
            torch.ones(B, dtype=torch.bool), state, list(range(B)), torch.tensor([10] * B), fb)
        return cand, must

    cand, must = plan(table)
    assert must is None  # no row near its overshoot limit
    assert (cand.ids[:, -1] == EOS).all()
    assert cand.valid[:, -1].tolist() == [True, False, False, True, False]
    assert cand.base_prob[0, -1] > 0
    # tokens: whether they end a sentence; stop slots: whether the output's last token did
    ended = torch.tensor([True, False, True, True, False]).view(-1, 1)
    assert torch.equal(cand.closes, torch.where(cand.ids == EOS, ended, cand.ids == DOT))
    off, _ = plan(None)
    assert off.closes is None and EOS not in off.ids[off.valid].tolist()


def test_config_refuses_an_unknown_setting(monkeypatch):
    from sglang_lenvm.config import ENV_VAR, LenVMConfig

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert LenVMConfig(lenvm_path="x").sentence_end == "on"
    LenVMConfig(lenvm_path="x", sentence_end="off").to_env()  # how it reaches the scheduler
    assert LenVMConfig.from_env().sentence_end == "off"
    with pytest.raises(ValueError, match="--lenvm-sentence-end must be one of"):
        LenVMConfig(lenvm_path="x", sentence_end="yes")


@pytest.mark.parametrize("use_kernels", [False, True])
def test_stop_slots_are_never_run_through_the_lenvm(use_kernels):
    """scorer._packed_positions: a stop-token candidate's value is 0 by definition, so the
    star forward leaves it out: on CPU every stop slot (appended or inside the top-k), on GPU
    the appended one (known on the host)."""
    from sglang_lenvm.runtime import scorer
    from sglang_lenvm.runtime.decision import Candidates

    EOS, R = 0, 1
    ids = torch.tensor([[4, EOS, 5, EOS], [6, 7, 8, EOS]])  # slot 3: the appended stop slot
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    cand = Candidates(ids=ids, base_prob=torch.full((2, 4), 0.25), valid=valid)
    memo = {}
    state = types.SimpleNamespace(
        num_candidates=3, top_ks=[3, 3], steer=[True, True],
        memo=lambda key, make: memo.setdefault(key, make()),
        memo_tensor=lambda keep: torch.tensor(keep))
    worker = types.SimpleNamespace(use_kernels=use_kernels)
    got = scorer._packed_positions(worker, state, [0, 1], cand, R,
                                   torch.tensor([[EOS, -1], [EOS, -1]])).tolist()
    T = R + 4
    if use_kernels:  # roots and the top_k slots; the stop token inside them cannot be seen
        assert got == [0, 1, 2, 3, T, T + 1, T + 2, T + 3]
    else:  # roots and the valid non-stop slots
        assert got == [0, 1, 3, T, T + 1, T + 2, T + 3]
