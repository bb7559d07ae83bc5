"""What each vocabulary id writes, read once from the tokenizer at start-up.

Shared by the repetition guard (which tokens are the same word, which continue a character)
and the sentence ends of the decision rule (which tokens end a sentence).
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple


def byte_alphabet() -> dict:
    """GPT-2's byte-to-character table, inverted: byte-level BPE token strings -> bytes."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
            + list(range(ord("\xae"), ord("\xff") + 1)))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def token_bytes(piece: str, alphabet: dict) -> Optional[bytes]:
    """The bytes of a byte-level (or byte-fallback) token string; None for other pieces."""
    m = _BYTE_TOKEN.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    if piece and all(ch in alphabet for ch in piece):
        return bytes(alphabet[ch] for ch in piece)
    return None


def token_texts(tokenizer, n: int) -> List[Tuple[Optional[str], Optional[bytes]]]:
    """(text, raw bytes) of ids 0 .. n-1. Byte-level tokens are read from their bytes (a
    fragment of a character decodes with U+FFFD in it); other tokens through the tokenizer's
    decode (raw None); an id the tokenizer cannot decode is (None, None)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    alphabet = byte_alphabet()
    out: List[Tuple[Optional[str], Optional[bytes]]] = []
    for i, piece in enumerate(pieces):
        raw = token_bytes(piece, alphabet) if isinstance(piece, str) else None
        if raw is not None:
            out.append((raw.decode("utf-8", errors="replace"), raw))
            continue
        try:
            out.append((tokenizer.decode([i]), None))
        except Exception:  # noqa: BLE001 - an undecodable id writes nothing we can read
            out.append((None, None))
    return out
