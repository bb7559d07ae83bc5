"""The repetition guard of guided rows: no n-unit phrase more than `limit` times in an output.

Why: a small base model that is kept writing past the point where it would have ended (at_least
before its target, equal steering toward a long budget) falls into loops ("The lost village.
The lost village. ..."), and no decision rule over the LenVM's values removes them: the loop's
tokens are the most likely ones (README, "Length and text quality"). SGLang's
repetition_penalty removes them too, but it reshapes every token's probability and cost a
quarter of the length score in our measurements; this guard only removes the candidates that
would write an n-gram of the output's own for the (limit + 1)-th time, HF's
`no_repeat_ngram_size` with a count, over phrases as a reader counts them (tokens, or CJK
characters: `banned_phrases`). It applies to guided rows only (unguided rows never reach the
scorer), before the candidates are chosen, so the torch and Triton paths see the same
logits and a banned token is never scored.

State: the last `WINDOW` output tokens of every row, a ring buffer `[B, WINDOW]` on the device
(`LengthState.recent`, -1 = empty). A decode step's input token is the output token before
this step's; it is written at its own position in the output (generated - 1), so a step that
writes twice writes the same thing. Positions derive from seq_len, as `generated` does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import torch

from sglang_lenvm.runtime.decision import mask_unless_empty
from sglang_lenvm.runtime.token_text import token_texts

# Output tokens remembered per row. Loops are local, but a phrase a reader sees three times in
# one answer is a repetition wherever it is: with 256, the guarded at_least outputs that ran on
# to 512 tokens still reused Chinese phrases whose first use had left the window
# (README, "The repetition guard"). 1024 covers the outputs of our benchmarks. Per guided step
# the guard does, on the device, a [B, W] sort and two to four n-gram passes over [B, W], each
# with a [B, V] count; its state is 8 KB per row.
WINDOW = 1024


def history_row(output_ids: Sequence[int]) -> list[int]:
    """A request's ring buffer row from its output so far (a state built mid-generation)."""
    row = [-1] * WINDOW
    start = max(0, len(output_ids) - WINDOW)
    for t in range(start, len(output_ids)):
        row[t % WINDOW] = int(output_ids[t])
    return row


def record(recent: torch.Tensor, rows: torch.Tensor, generated: torch.Tensor,
           tokens: torch.Tensor) -> None:
    """In place: output token number `generated - 1` of each row is `tokens` (decode inputs)."""
    pos = (generated - 1).clamp_min(0) % WINDOW  # raw ids; mask_repeats maps them to classes
    keep = generated >= 1
    old = recent[rows, pos]
    recent.index_put_((rows, pos), torch.where(keep, tokens.to(recent.dtype), old))


def ordered(recent: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """[B, WINDOW] the last WINDOW output tokens in order (oldest first), -1 before the start."""
    t = generated.view(-1, 1) - WINDOW + torch.arange(WINDOW, device=recent.device).view(1, -1)
    hist = recent.gather(1, t.remainder(WINDOW))
    return torch.where(t >= 0, hist, torch.full_like(hist, -1))


def banned(history: torch.Tensor, n: int, limit: int, vocab: int) -> torch.Tensor:
    """[B, vocab] True for tokens x such that (last n-1 tokens, x) already occurs `limit` times.

    history [B, W] oldest first, -1 = empty (empties never match: token ids are >= 0).
    """
    B, W = history.shape
    if n < 1 or W < n:
        return torch.zeros((B, vocab), dtype=torch.bool, device=history.device)
    grams = history.unfold(1, n, 1)  # [B, W-n+1, n]: every n-gram, the last one included
    nxt = grams[:, :, -1]
    if n > 1:
        tail = history[:, W - n + 1:]  # the n-1 tokens this step's token follows
        match = (grams[:, :, :-1] == tail.unsqueeze(1)).all(-1) & (tail >= 0).all(-1, True)
    else:
        match = torch.ones_like(nxt, dtype=torch.bool)
    match &= nxt >= 0
    cols = torch.where(match, nxt, torch.full_like(nxt, vocab)).clamp(max=vocab)
    counts = torch.zeros((B, vocab + 1), dtype=torch.int32, device=history.device)
    counts.scatter_add_(1, cols, torch.ones_like(cols, dtype=torch.int32))
    return counts[:, :vocab] >= limit


def banned_phrases(history: torch.Tensor, units: torch.Tensor, max_units: int, n: int,
                   limit: int, vocab: int) -> torch.Tensor:
    """`banned` with phrases of n units: for each token x, the n-gram is x after the shortest
    tail of the output (1 to n-1 tokens) that, with x, writes at least n units; n-1 tokens if
    none does. With one unit per token (max_units 1) that is `banned(history, n, ...)`.

    units [vocab]: the units of each id in `history` and of each x (TokenClasses.units).
    """
    B, W = history.shape
    if max_units <= 1 or n <= 2 or W < n:
        return banned(history, n, limit, vocab)
    tail = history[:, W - n + 1:]
    tail_units = torch.where(tail >= 0, units[tail.clamp(0, vocab - 1)], 0)
    # written[:, m-1]: the units of the last m tokens (m = 1 .. n-2).
    written = tail_units.flip(1).cumsum(1)[:, : n - 2]
    units = units[:vocab].view(1, -1)
    ban = torch.zeros((B, vocab), dtype=torch.bool, device=history.device)
    decided = torch.zeros_like(ban)
    for m in range(1, n - 1):
        enough = ~decided & (written[:, m - 1 : m] + units >= n)
        ban |= enough & banned(history, m + 1, limit, vocab)
        decided |= enough
    return ban | (~decided & banned(history, n, limit, vocab))


@dataclasses.dataclass(frozen=True)
class TokenClasses:
    """How the guard reads tokens, made once from the tokenizer.

    - `canon` [V]: the class a token counts as: tokens with the same word characters, whatever
      their case, whitespace and punctuation (" The", "the", "The"; "-powered", " Powered"),
      are one class, so "The answer is ... the answer is" and "Solar-Powered ... solar-powered"
      repeat a phrase as a reader sees it (the repetition measure reads words the same way).
      Tokens without a word character are classes by their stripped text (" ," and ",").
      The class id is the smallest token id of the class.
    - `continues` [V]: tokens that continue a character (byte-level BPE splits most CJK
      characters into byte tokens; these start with a UTF-8 continuation byte). They are never
      banned: once a character's first byte is written, banning its second would only swap the
      character for another one, or for an invalid byte sequence. They still count in the
      n-grams, and the guard acts at the next character's first byte.
    - `units` [V]: how many units of a phrase a token writes: its CJK characters, at least 1
      (a word or word piece, punctuation, a byte: 1). A reader counts a Chinese phrase in
      characters, and a vocabulary's whole-word Chinese tokens ("可以") write two or more at
      once, so n tokens of Chinese can be a phrase of 2n characters (`banned_phrases`).
    - `max_units`: the largest of `units`, on the host (1: tokens are units, as in English).
    - `silent` [V]: tokens with no word in them (punctuation, whitespace, "##"): a reader
      reads "2.2 - 2.2 - 2.2" or "一位；丙 ... 一位丙" as the same words again, so phrases
      are also counted with these left out (`mask_repeats`). Parts of characters are not
      silent.
    """

    canon: torch.Tensor  # int64 [V]
    continues: torch.Tensor  # bool [V]
    units: torch.Tensor  # int64 [V]
    max_units: int
    silent: torch.Tensor  # bool [V]


# CJK characters, the unit of a Chinese phrase, and a word (both as benchmarks/quality.py reads
# text: its repetition measure is the guard's target).
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[^\W_]")
_WORD_RUN = re.compile(r"[^\W_]+")


def token_classes(tokenizer, vocab: int, device) -> TokenClasses:
    """`TokenClasses` of a tokenizer (None: every token is its own class of one unit, none
    continues)."""
    canon = list(range(vocab))
    continues = [False] * vocab
    units = [1] * vocab
    silent = [False] * vocab
    if tokenizer is not None:
        n = min(vocab, len(tokenizer))
        first: dict = {}
        for i, (text, raw) in enumerate(token_texts(tokenizer, n)):
            if text is None:
                continue  # an undecodable id is its own class
            # no bytes to look at: never ban a fragment
            continues[i] = (bool(raw) and 0x80 <= raw[0] <= 0xBF) if raw is not None else (
                "\ufffd" in text)
            # A byte-level BPE spells "Solar-Powered" as "Solar" "-" "Powered" in one place and
            # " solar" "-powered" in another: one phrase to a reader, and one to the guard only
            # if "-powered" and "Powered" are one class (it missed such repeats: README, "The
            # repetition guard").
            key = "".join(_WORD_RUN.findall(text.lower())) or text.strip().lower()
            if key and "\ufffd" not in key:
                canon[i] = first.setdefault(key, i)
            units[i] = max(1, len(_CJK.findall(text)))
            silent[i] = "\ufffd" not in text and not _WORD.search(text)
    return TokenClasses(torch.tensor(canon, dtype=torch.int64, device=device),
                        torch.tensor(continues, dtype=torch.bool, device=device),
                        torch.tensor(units, dtype=torch.int64, device=device), max(units),
                        torch.tensor(silent, dtype=torch.bool, device=device))


def mask_repeats(logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor, n: int,
                 limit: int, classes: TokenClasses) -> None:
    """In place: -inf on the tokens that would repeat a phrase (`banned_phrases` over the
    history's classes) for the (limit + 1)-th time, in the rows where `rows` is True; counted
    twice: over every token, and, for tokens with a word in them, over the words alone
    (`silent` tokens left out). Tokens that continue a character are never banned.

    A row that would be left with no finite logit (a grammar that allows only the repeat) is
    left alone: the guard never makes a request impossible.
    """
    V = logits.shape[1]
    canon = classes.canon[:V]
    history = torch.where(history >= 0, canon[history.clamp(0, V - 1)], history)
    ban = banned_phrases(history, classes.units, classes.max_units, n, limit, V)
    ban |= banned_phrases(words_only(history, classes.silent), classes.units,
                          classes.max_units, n, limit, V) & ~classes.silent[:V].view(1, -1)
    ban = ban.index_select(1, canon) & rows.view(-1, 1) & ~classes.continues[:V].view(1, -1)
    mask_unless_empty(logits, ban)


def words_only(history: torch.Tensor, silent: torch.Tensor) -> torch.Tensor:
    """[B, W] the history without its silent tokens, still oldest first and right-aligned
    (the dropped positions become -1 at the left)."""
    keep = (history >= 0) & ~silent[history.clamp(min=0)]
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
    return torch.where(keep.gather(1, order), history.gather(1, order), -1)
