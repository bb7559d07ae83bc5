"""The repetition guard of guided rows: no token n-gram more than `limit` times in an output.

Why: a small base model that is kept writing past the point where it would have ended (at_least
before its target, equal steering toward a long budget) falls into loops ("The lost village.
The lost village. ..."), and no decision rule over the LenVM's values removes them: the loop's
tokens are the most likely ones (README, "Length and text quality"). SGLang's
repetition_penalty removes them too, but it reshapes every token's probability and cost a
quarter of the length score in our measurements; this guard only removes the candidates that
would write an n-gram of the output's own for the (limit + 1)-th time, HF's
`no_repeat_ngram_size` with a count. It applies to guided rows only (unguided rows never reach
the scorer), before the candidates are chosen, so the torch and Triton paths see the same
logits and a banned token is never scored.

State: the last `WINDOW` output tokens of every row, a ring buffer `[B, WINDOW]` on the device
(`LengthState.recent`, -1 = empty). A decode step's input token is the output token before
this step's; it is written at its own position in the output (generated - 1), so a step that
writes twice writes the same thing. Positions derive from seq_len, as `generated` does.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

NEG_INF = float("-inf")
WINDOW = 256  # output tokens remembered per row: loops are local


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
    pos = (generated - 1).clamp_min(0) % WINDOW
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


def partial_tokens(tokenizer, vocab: int, device) -> Optional[torch.Tensor]:
    """[vocab] True for tokens that are part of a character, not a whole one (byte-level BPE
    splits most CJK characters into two or three byte tokens; they decode to U+FFFD alone).

    The guard never bans them: banning the second byte of a character whose first byte is
    written would only swap the character for another one, or for an invalid byte sequence.
    The n-grams still count them; a loop is cut at its next whole token.
    """
    if tokenizer is None:
        return None
    out = torch.zeros(vocab, dtype=torch.bool)
    for i in range(min(vocab, len(tokenizer))):
        try:
            text = tokenizer.decode([i])
        except Exception:  # noqa: BLE001 - an undecodable id is no whole character either
            text = "\ufffd"
        out[i] = "\ufffd" in text
    return out.to(device)


def mask_repeats(logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor, n: int,
                 limit: int, spare: Optional[torch.Tensor] = None) -> None:
    """In place: -inf on the tokens `banned` names, in the rows where `rows` is True; tokens
    where `spare` [V] is True are never banned.

    A row that would be left with no finite logit (a grammar that allows only the repeat) is
    left alone: the guard never makes a request impossible.
    """
    ban = banned(history, n, limit, logits.shape[1]) & rows.view(-1, 1)
    if spare is not None:
        ban &= ~spare[: logits.shape[1]].view(1, -1)
    masked = logits.masked_fill(ban, NEG_INF)
    still_finite = torch.isfinite(masked).any(dim=1, keepdim=True)
    logits.copy_(torch.where(still_finite, masked, logits))
