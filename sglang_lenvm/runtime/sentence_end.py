"""The tokens that end a sentence, a vocabulary-sized table made once from the tokenizer.

Why: a guided output must end where its budget does, and the base model only gives its stop
token a real probability after a sentence has ended. The LenVM alone did not steer toward
sentence ends as the budget ran out: `equal` outputs were cut at their overshoot limit by a stop
token that cost 10 to 31 nats under the base model (README, "Where the text ends"). With this
table the decision counts a sentence end as a way to be one token from the end
(`decision.decide`), and the scorer makes the stop token a candidate right after one
(`scorer._plan_candidates`).
"""

from __future__ import annotations

import torch

from sglang_lenvm.runtime.token_text import token_texts

# A sentence ends with one of these marks, perhaps followed by closing quotes or brackets,
# markdown emphasis, and whitespace (". ", ".\n\n", '."', "。」").
MARKS = ".!?\u2026\u3002\uff01\uff1f"  # . ! ? … 。 ！ ？
TRAILING = " \t\r\n\"'*)]\u201d\u2019\u300d\u300f\u00bb\uff09"


def ends_sentence(text: str) -> bool:
    body = text.rstrip(TRAILING)
    return bool(body) and body[-1] in MARKS and "\ufffd" not in body


def sentence_ends(tokenizer, vocab: int, device) -> torch.Tensor:
    """bool [vocab]: ids whose text ends a sentence (none without a tokenizer; ids past it,
    padding rows of the embedding, never)."""
    ends = [False] * vocab
    if tokenizer is not None:
        for i, (text, _) in enumerate(token_texts(tokenizer, min(vocab, len(tokenizer)))):
            ends[i] = text is not None and ends_sentence(text)
    return torch.tensor(ends, dtype=torch.bool, device=device)
