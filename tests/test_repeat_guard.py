"""The repetition guard's tensors against a plain-Python n-gram count."""

import random
from collections import Counter

import pytest
import torch

from sglang_lenvm.runtime import repeat_guard, token_text
from sglang_lenvm.runtime.repeat_guard import WINDOW


def reference_banned(output, n, limit, vocab):
    """Tokens x for which (last n-1 tokens of the window, x) already occurs `limit` times."""
    window = output[-WINDOW:]
    grams = Counter(tuple(window[i:i + n]) for i in range(len(window) - n + 1))
    tail = tuple(window[len(window) - n + 1:]) if n > 1 else ()
    if len(tail) != n - 1:
        return set()
    return {x for x in range(vocab) if grams[tail + (x,)] >= limit}


def ring(outputs):
    recent = torch.full((len(outputs), WINDOW), -1, dtype=torch.int64)
    rows = torch.arange(len(outputs))
    # Written the way decode steps write it: one token per step, at its own position.
    for t in range(max(len(o) for o in outputs)):
        live = [i for i, o in enumerate(outputs) if t < len(o)]
        idx = torch.tensor(live)
        repeat_guard.record(recent, idx, torch.full((len(live),), t + 1),
                            torch.tensor([outputs[i][t] for i in live]))
    return recent, rows


@pytest.mark.parametrize("n,limit", [(1, 3), (2, 1), (3, 2), (4, 2)])
def test_banned_matches_python_counts(n, limit):
    rng = random.Random(n * 10 + limit)
    vocab = 6
    outputs = [[rng.randrange(vocab) for _ in range(length)]
               for length in (0, 2, 7, 40, WINDOW + 37)]
    outputs += [[1, 2, 3] * 30]  # a loop
    recent, _ = ring(outputs)
    generated = torch.tensor([len(o) for o in outputs])
    history = repeat_guard.ordered(recent, generated)
    for i, o in enumerate(outputs):  # the ring, in order, is the last WINDOW tokens
        want = o[-WINDOW:]
        assert history[i, WINDOW - len(want):].tolist() == want
        assert (history[i, : WINDOW - len(want)] == -1).all()
    got = repeat_guard.banned(history, n, limit, vocab)
    for i, o in enumerate(outputs):
        assert set(got[i].nonzero().view(-1).tolist()) == reference_banned(o, n, limit, vocab)
    # The loop ends "... 1 2 3": whatever n, going on with "1" repeats it a 30th time.
    assert got[-1].nonzero().view(-1).tolist() == ([1, 2, 3] if n == 1 else [1])


def reference_banned_phrases(output, units, n, limit, vocab):
    """Tokens x for which (tail, x) already occurs `limit` times, where tail is the shortest
    1 to n-1 last tokens that with x write n units (n-1 tokens if none do)."""
    window = output[-WINDOW:]
    out = set()
    for x in range(vocab):
        m = next((m for m in range(1, n - 1)
                  if len(window) >= m and sum(units[t] for t in window[-m:]) + units[x] >= n),
                 n - 1)
        grams = Counter(tuple(window[i:i + m + 1]) for i in range(len(window) - m))
        if len(window) >= m and grams[tuple(window[len(window) - m:]) + (x,)] >= limit:
            out.add(x)
    return out


@pytest.mark.parametrize("n,limit", [(2, 1), (3, 2), (4, 2), (5, 1)])
def test_banned_phrases_counts_units(n, limit):
    rng = random.Random(n * 7 + limit)
    vocab = 7
    units = torch.tensor([1, 1, 1, 2, 2, 3, 1])  # 3, 4: two-character words; 5: three
    outputs = [[rng.randrange(vocab) for _ in range(length)] for length in (0, 1, 5, 60, 300)]
    outputs += [[3, 4, 0] * 20, [0, 1, 2] * 20]  # a loop of words, a loop of one-unit tokens
    recent, _ = ring(outputs)
    history = repeat_guard.ordered(recent, torch.tensor([len(o) for o in outputs]))
    got = repeat_guard.banned_phrases(history, units, int(units.max()), n, limit, vocab)
    for i, o in enumerate(outputs):
        want = reference_banned_phrases(o, units.tolist(), n, limit, vocab)
        assert set(got[i].nonzero().view(-1).tolist()) == want, (i, n, limit)
    # One unit per token: the token n-gram ban, unchanged.
    ones = torch.ones(vocab, dtype=torch.int64)
    assert torch.equal(repeat_guard.banned_phrases(history, ones, 1, n, limit, vocab),
                       repeat_guard.banned(history, n, limit, vocab))
    if n == 3:
        # "... 3 4 0": the two-character word 3 after 0 writes the 3-unit phrase "0 3" a
        # 20th time, so the bigram (0, 3) decides, not the token 3-gram.
        assert got[-2].nonzero().view(-1).tolist() == [3]


def test_history_row_is_what_decode_steps_write():
    out = list(range(WINDOW + 10))
    recent, _ = ring([out])
    assert repeat_guard.history_row(out) == recent[0].tolist()
    assert repeat_guard.history_row([5, 6]) == [5, 6] + [-1] * (WINDOW - 2)


def test_record_twice_and_before_any_output():
    recent = torch.full((2, WINDOW), -1, dtype=torch.int64)
    rows, tokens = torch.tensor([0, 1]), torch.tensor([7, 8])
    repeat_guard.record(recent, rows, torch.tensor([3, 0]), tokens)
    repeat_guard.record(recent, rows, torch.tensor([3, 0]), tokens)  # idempotent
    assert recent[0, 2] == 7 and (recent[0, torch.arange(WINDOW) != 2] == -1).all()
    assert (recent[1] == -1).all()  # generated 0: a prefill's input is no output token


def plain_classes(vocab):
    return repeat_guard.token_classes(None, vocab, "cpu")


def test_mask_repeats_rows_and_never_empty():
    history = torch.tensor([[-1, 1, 2, 1, 2, 1, 2], [-1, 1, 2, 1, 2, 1, 2],
                            [-1, 1, 2, 1, 2, 1, 2], [-1, -1, -1, -1, -1, -1, 3]])
    logits = torch.zeros(4, 5)
    logits[2, :] = float("-inf")
    logits[2, 1] = 0.0  # a grammar that allows only the repeat
    rows = torch.tensor([True, False, True, True])
    repeat_guard.mask_repeats(logits, history, rows, 2, 2, plain_classes(5))
    # Row 0: "2 1" occurred twice, so 1 is banned after "... 2"
    assert torch.isinf(logits[0, 1]) and torch.isfinite(logits[0, [0, 2, 3, 4]]).all()
    assert torch.isfinite(logits[1]).all()  # not a guided row
    assert logits[2, 1] == 0.0  # left alone rather than emptied
    assert torch.isfinite(logits[3]).all()  # nothing repeated


class ByteLevel:
    """A byte-level BPE vocabulary in GPT-2's alphabet: ids 0-255 are the bytes, then words."""

    WORDS = ["the", "\u0120the", "\u0120The", "The", "\u0120answer", "\u0120Answer", "\u0120is",
             "\u010a", "\u0120\u0120", "\u6211\u4eec", "\u53ef\u4ee5", "\uff0c",  # 我们 可以 ，
             "-powered", "Powered", "\u0120solar", "Solar", "\u0120backpack"]

    def __init__(self):
        table = {b: ch for ch, b in token_text.byte_alphabet().items()}
        # Words in the byte alphabet, as a byte-level BPE vocabulary stores them.
        words = ["".join(table[b] for b in w.encode()) if ord(w[0]) > 0x3000 else w
                 for w in self.WORDS]
        self.pieces = [table[b] for b in range(256)] + words
        self.alphabet = token_text.byte_alphabet()

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def decode(self, ids):
        raw = b"".join(bytes(self.alphabet[c] for c in self.pieces[i]) for i in ids)
        return raw.decode("utf-8", errors="replace")


def test_token_classes_of_a_byte_level_tokenizer():
    tok = ByteLevel()
    cl = repeat_guard.token_classes(tok, len(tok) + 4, "cpu")
    word = {w: 256 + i for i, w in enumerate(ByteLevel.WORDS)}
    # Case and leading whitespace do not make another word: one class, its smallest id.
    the = [word[w] for w in ("the", "\u0120the", "\u0120The", "The")]
    assert cl.canon[the].tolist() == [the[0]] * 4
    assert cl.canon[word["\u0120answer"]] == cl.canon[word["\u0120Answer"]] == word["\u0120answer"]
    assert cl.canon[word["\u0120is"]] == word["\u0120is"]
    # Whitespace-only tokens and padding rows past the tokenizer stay their own class.
    assert cl.canon[word["\u010a"]] == word["\u010a"] and cl.canon[len(tok) + 2] == len(tok) + 2
    # Bytes: ASCII letters are classes of their own case ("a" and "A" are one class); a
    # character's first byte is bannable, a continuation byte is not.
    assert cl.canon[ord("A")] == cl.canon[ord("a")] == ord("A")
    assert cl.continues[0x80] and cl.continues[0xBD] and not cl.continues[0xE7]
    assert not cl.continues[ord("a")] and not cl.continues[word["\u0120the"]]
    assert not cl.continues[256 + len(ByteLevel.WORDS):].any()


def test_silent_tokens_and_words_only():
    tok = ByteLevel()
    cl = repeat_guard.token_classes(tok, len(tok), "cpu")
    w = {x: 256 + i for i, x in enumerate(ByteLevel.WORDS)}
    silent = [ord(","), ord(" "), ord("#"), ord("\n"), w["\uff0c"], w["\u010a"], w["\u0120\u0120"]]
    loud = [ord("a"), ord("7"), 0xE7, 0x99, w["\u6211\u4eec"], w["\u0120the"]]
    assert cl.silent[silent].all() and not cl.silent[loud].any()
    x, y, z = ord("x"), ord("y"), ord("z")
    history = torch.tensor([[-1, x, ord(","), y, ord(" "), z], [z, y, -1, ord("#"), -1, x]])
    got = repeat_guard.words_only(history, cl.silent)
    assert got.tolist() == [[-1, -1, -1, x, y, z], [-1, -1, -1, z, y, x]]


def test_mask_repeats_matches_python_over_tokens_and_words():
    """The whole guard against a plain-Python count: a token is banned if, in class space, its
    phrase over all tokens or (a token with a word) over the words alone is at its limit."""
    tok = ByteLevel()
    cl = repeat_guard.token_classes(tok, len(tok), "cpu")
    w = {x: 256 + i for i, x in enumerate(ByteLevel.WORDS)}
    pool = [ord("a"), ord("b"), ord(","), ord(" "), w["\u0120the"], w["The"], w["\uff0c"],
            w["\u6211\u4eec"], w["\u53ef\u4ee5"], 0xE7, 0x99]
    rng = random.Random(3)
    outputs = [[rng.choice(pool) for _ in range(length)] for length in (3, 40, 200, 600)]
    canon, units = cl.canon.tolist(), cl.units.tolist()
    silent, continues = cl.silent.tolist(), cl.continues.tolist()
    V = len(tok)
    for n, limit in ((3, 2), (2, 1), (4, 1)):
        for out in outputs:
            hist = torch.tensor([[-1] * (WINDOW - len(out[-WINDOW:])) + out[-WINDOW:]])
            logits = torch.zeros(1, V)
            repeat_guard.mask_repeats(logits, hist, torch.tensor([True]), n, limit, cl)
            classes = [canon[t] for t in out]
            words = [t for t in classes if not silent[t]]
            all_ban = reference_banned_phrases(classes, units, n, limit, V)
            word_ban = reference_banned_phrases(words, units, n, limit, V)
            want = {x for x in range(V) if not continues[x]
                    and (canon[x] in all_ban or (canon[x] in word_ban and not silent[x]))}
            assert set(torch.isinf(logits[0]).nonzero().view(-1).tolist()) == want, (n, limit)


def test_classes_make_case_variants_one_phrase_and_spare_continuations():
    tok = ByteLevel()
    cl = repeat_guard.token_classes(tok, len(tok), "cpu")
    w = {x: 256 + i for i, x in enumerate(ByteLevel.WORDS)}
    # "The answer is ... the Answer is ... The answer" -> " is" would be the third time.
    out = [w["The"], w["\u0120answer"], w["\u0120is"], ord("."), w["\u0120the"],
           w["\u0120Answer"], w["\u0120is"], ord("."), w["\u0120The"], w["\u0120answer"]]
    history = torch.tensor([[-1] * 4 + out])
    logits = torch.zeros(1, len(tok))
    repeat_guard.mask_repeats(logits, history, torch.tensor([True]), 3, 2, cl)
    assert torch.isinf(logits[0, w["\u0120is"]]) and torch.isfinite(logits[0, ord(".")])
    # Chinese words count their characters: "我们可以，我们可以，我们" -> 可以 would write
    # the phrase 们可以 a third time, though the token 3-gram "， 我们 可以" is only at its second.
    assert cl.units[[w["\u6211\u4eec"], w["\uff0c"], ord("a"), 0xE7]].tolist() == [2, 1, 1, 1]
    assert cl.max_units == 2
    we, can, comma = w["\u6211\u4eec"], w["\u53ef\u4ee5"], w["\uff0c"]
    history = torch.tensor([[-1, we, can, comma, we, can, comma, we]])
    logits = torch.zeros(1, len(tok))
    repeat_guard.mask_repeats(logits, history, torch.tensor([True]), 3, 2, cl)
    assert torch.isinf(logits[0, can]) and torch.isfinite(logits[0, comma])
    assert not repeat_guard.banned(history, 3, 2, len(tok))[0, can]
    # Phrases are also counted over words alone: "ab,c;abc;ab" -> c would write the words
    # "a b c" a third time, though the token 3-gram "a b c" is only at its second.
    a, b, c = ord("a"), ord("b"), ord("c")
    history = torch.tensor([[-1, a, b, ord(","), c, ord(";"), a, b, c, ord(";"), a, b]])
    logits = torch.zeros(1, len(tok))
    repeat_guard.mask_repeats(logits, history, torch.tensor([True]), 3, 2, cl)
    assert torch.isinf(logits[0, c]) and torch.isfinite(logits[0, [a, b, ord(",")]]).all()
    assert not repeat_guard.banned(history, 3, 2, len(tok))[0, c]
    # 白 (E7 99 BD) twice, then E7 99: BD would be its third time but continues a character.
    hist = torch.tensor([[-1, 0xE7, 0x99, 0xBD, 0xE7, 0x99, 0xBD, 0xE7, 0x99]])
    logits = torch.zeros(1, len(tok))
    repeat_guard.mask_repeats(logits, hist, torch.tensor([True]), 3, 2, cl)
    assert torch.isfinite(logits).all()
    # ... and after 白白, a third character starting with E7 after "99 BD" is banned at E7.
    hist = torch.tensor([[-1, 0xE7, 0x99, 0xBD, 0xE7, 0x99, 0xBD, 0xE7, 0x99, 0xBD]])
    logits = torch.zeros(1, len(tok))
    repeat_guard.mask_repeats(logits, hist, torch.tensor([True]), 3, 2, cl)
    assert torch.isinf(logits[0, 0xE7]) and torch.isfinite(logits[0, ord("a")])


# ---- end to end: the guard in a server --------------------------------------------------

PROMPTS = ["abc", "xyzzy", "hello", "ABCdef", "the cat", "qqq", "lorem ipsum", "zz top"]


def worst_repeat(ids, n=3):
    return max(Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)).values())


@pytest.fixture(scope="module")
def unguarded_server(models, tmp_path_factory):
    """The oracle pair with the repetition guard off; conftest's oracle_server has it on (the
    default, --lenvm-repeat-ngram 3, --lenvm-repeat-limit 2) and the host-sync guard."""
    from sglang_lenvm.testing.server_process import Server

    s = Server(["--model-path", str(models / "cbase"), "--lenvm-path", str(models / "oracle"),
                "--lenvm-repeat-ngram", "0"],
               tmp_path_factory.mktemp("logs") / "unguarded.log")
    yield s
    s.stop()


def _gen(server, text, **sp):
    r = server.post("/generate", {"text": text, "sampling_params": sp})
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def _each(server, **sp):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        return list(ex.map(lambda p: _gen(server, p, max_new_tokens=150, **sp), PROMPTS))


def test_guided_outputs_do_not_loop_and_unguided_ones_are_untouched(oracle_server,
                                                                     unguarded_server):
    greedy_at_least = dict(temperature=0, length_target=150, length_mode="at_least")
    # Without the guard the random base model loops when it is kept writing (greedy, no stop
    # token), guided or not: the guard has something to remove.
    assert max(worst_repeat(o) for o in _each(unguarded_server, **greedy_at_least)) > 2
    plain = _each(oracle_server, temperature=0, ignore_eos=True)
    assert max(worst_repeat(o) for o in plain) > 2
    # Unguided rows never see the guard: the same as on the server without it.
    assert plain == _each(unguarded_server, temperature=0, ignore_eos=True)
    for o in _each(oracle_server, **greedy_at_least):
        assert len(o) == 150 and worst_repeat(o) <= 2, o
    for o in _each(oracle_server, temperature=1.0, length_target=40):
        assert worst_repeat(o) <= 2, o
    stats = oracle_server.get("/lenvm/stats").json()[0]
    assert stats["repeat_ngram"] == 3 and stats["repeat_limit"] == 2
    assert stats["host_syncs"] == 0  # the guard's step adds no host-device sync


def test_words_spelled_with_other_punctuation_are_one_phrase():
    """ "Solar-Powered backpack ... solar-powered backpack ... Solar-Powered" -> " backpack"
    would write the words "solar powered backpack" a third time, though one spelling has the
    token "-powered" and the other "-" then "Powered"."""
    tok = ByteLevel()
    cl = repeat_guard.token_classes(tok, len(tok), "cpu")
    w = {x: 256 + i for i, x in enumerate(ByteLevel.WORDS)}
    assert cl.canon[w["-powered"]] == cl.canon[w["Powered"]]
    assert cl.canon[w["\u0120solar"]] == cl.canon[w["Solar"]]
    assert cl.canon[ord("-")] != cl.canon[w["-powered"]]  # punctuation alone stays itself
    dash, dot = ord("-"), ord(".")
    out = [w["Solar"], dash, w["Powered"], w["\u0120backpack"], dot,
           w["\u0120solar"], w["-powered"], w["\u0120backpack"], dot,
           w["Solar"], dash, w["Powered"]]
    history = torch.tensor([[-1] * 3 + out])
    logits = torch.zeros(1, len(tok))
    repeat_guard.mask_repeats(logits, history, torch.tensor([True]), 3, 2, cl)
    assert torch.isinf(logits[0, w["\u0120backpack"]]) and torch.isfinite(logits[0, dot])
