"""Tiny random models and a locally trained tokenizer, built on the fly (no model hub needed).

Tests, benchmark smoke runs and examples use these: a base LM and LenVM checkpoints in the
published layout (backbone `save_pretrained` + `value_head.safetensors`, or `v_head.*` tensors
inside the shards), all sharing one tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _training_corpus() -> list[str]:
    """Deterministic English text from the standard library's own docstrings."""
    import collections
    import json as json_mod
    import string
    import textwrap

    texts = []
    for mod in (string, textwrap, collections, json_mod, os.path):
        texts.append(mod.__doc__ or "")
        for name in dir(mod):
            doc = getattr(getattr(mod, name), "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    texts += [
        "The capital of France is Paris. Count from one to ten: 1 2 3 4 5 6 7 8 9 10.",
        "Please answer the question in a few words. Write a long story about a dragon.",
    ]
    return [t for t in texts if t.strip()]


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer with a ChatML template and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_char_tokenizer(out_dir: str | os.PathLike, n_chars: int = 45):
    """A character-level tokenizer with a tiny vocabulary: 3 specials + `n_chars` letters.

    A byte-level BPE with no merges, so every letter is one token (and transformers' Qwen2 /
    Llama tokenizer classes, which rebuild the pipeline from vocab + merges, agree with it).
    With a vocabulary this small a request's top_k can cover every token, which makes exact
    tests of the decision rules possible. Token id i + 3 is the i-th letter of CHARS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = CHARS[:n_chars]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def claimed_remaining(token_id: int, eos_id: int) -> int:
    """The oracle LenVM's claim: after the i-th letter (id i + 3) exactly i + 1 tokens remain."""
    return 0 if token_id == eos_id else (token_id - 2 if token_id >= 3 else 60)


def build_oracle_lenvm(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
                       gamma: float = 0.9, head_placement: str = "shards", arch: str = "qwen2",
                       nan_token: Optional[int] = None):
    """A LenVM whose value is a known function of the prefix: of its last token only.

    The backbone's attention and MLP outputs are zeroed (o_proj, down_proj = 0), so the final
    hidden state is the normalized embedding of the current token; embeddings are one-hot, and
    the head maps one-hot(i) to z = logit(1 - gamma^c(i)) with c = `claimed_remaining`. So
    after a token claiming c, the LenVM predicts exactly c remaining tokens.

    `nan_token`: a broken LenVM for fault tests: that token's embedding is infinite, so every
    state at or after it in a sequence has a NaN value (other sequences are unaffected).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = len(tok)
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    hidden = max(64, vocab)
    build_lenvm(out_dir, tokenizer_dir, head_placement="none", arch=arch, hidden=hidden, layers=2,
                heads=4, kv_heads=2, gamma=gamma)
    from safetensors.torch import load_file, save_file

    shard = Path(out_dir) / "model.safetensors"
    w = load_file(str(shard))
    for name in list(w):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name] = torch.zeros_like(w[name])
    emb = torch.zeros(vocab, hidden)
    emb[torch.arange(vocab), torch.arange(vocab)] = 1.0
    if nan_token is not None:
        emb[nan_token, nan_token] = float("inf")
    w["model.embed_tokens.weight"] = emb
    # RMSNorm(one_hot) = sqrt(hidden) * one_hot; fc = identity, so silu(sqrt(H)) on one unit.
    act = torch.nn.functional.silu(torch.tensor(float(hidden) ** 0.5))
    p = torch.tensor([1.0 - gamma ** claimed_remaining(i, eos_id) for i in range(vocab)],
                     dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    z = torch.log(p / (1 - p)).float()
    summary = torch.zeros(1, hidden)
    summary[0, :vocab] = z / act
    head = {
        "v_head.fc.weight": torch.eye(hidden),
        "v_head.fc.bias": torch.zeros(hidden),
        "v_head.summary.weight": summary,
        "v_head.summary.bias": torch.zeros(1),
    }
    if head_placement == "shards":
        w.update(head)
    else:
        save_file(head, str(Path(out_dir) / "value_head.safetensors"))
    save_file({k: v.contiguous() for k, v in w.items()}, str(shard), metadata={"format": "pt"})
    return Path(out_dir)


def _config(arch: str, vocab_size: int, eos_id: int, pad_id: int, hidden: int, layers: int,
            heads: int, kv_heads: int, max_pos: int, tie: bool):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        torch_dtype="float32",
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=hidden // heads, **common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown arch {arch!r}")


def build_causal_lm(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
                    arch: str = "qwen2", hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, max_pos: int = 4096, tie: bool = False, seed: int = 0,
                    extra_vocab: int = 0):
    """A random causal LM saved with `save_pretrained`, plus the tokenizer files beside it.

    `extra_vocab` rows past the tokenizer's tokens pad the vocabulary, as many released models
    pad theirs (Qwen2.5-7B has 152064 rows for 151665 tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = _config(arch, len(tok) + extra_vocab, eos_id, tok.pad_token_id, hidden, layers, heads,
                  kv_heads, max_pos, tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init with std 0.02 gives near-uniform logits; widen it so greedy decoding
    # has clear winners and sampled lengths vary.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return model


def random_value_head(hidden: int, seed: int = 1, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "v_head.fc.weight": torch.randn(hidden, hidden, generator=g) * scale,
        "v_head.fc.bias": torch.randn(hidden, generator=g) * scale,
        "v_head.summary.weight": torch.randn(1, hidden, generator=g) * scale,
        "v_head.summary.bias": torch.randn(1, generator=g) * scale,
    }


def random_candidate_head(hidden: int, seed: int = 2, scale: float = 0.3) -> dict:
    """A random one-pass candidate head (value_head.CandidateHead, c_head.* names)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "c_head.state.weight": torch.randn(hidden, hidden, generator=g) * scale,
        "c_head.state.bias": torch.randn(hidden, generator=g) * scale,
        "c_head.token.weight": torch.randn(hidden, hidden, generator=g) * scale,
        "c_head.summary.weight": torch.randn(1, hidden, generator=g) * scale,
        "c_head.summary.bias": torch.randn(1, generator=g) * scale,
    }


def oracle_candidate_head(oracle_dir: str | os.PathLike) -> dict:
    """The candidate head that scores exactly what the oracle LenVM's star tree scores: the
    oracle's value after s + x depends on x alone, its final hidden state sqrt(H) one-hot(x)
    is sqrt(H) times x's (one-hot) embedding, so token = sqrt(H) I, state = 0, and the
    oracle's own summary."""
    from safetensors.torch import load_file

    w = load_file(str(Path(oracle_dir) / "model.safetensors"))
    summary_w, summary_b = w["v_head.summary.weight"], w["v_head.summary.bias"]
    hidden = summary_w.shape[1]
    return {
        "c_head.state.weight": torch.zeros(hidden, hidden),
        "c_head.state.bias": torch.zeros(hidden),
        "c_head.token.weight": torch.eye(hidden) * hidden ** 0.5,
        "c_head.summary.weight": summary_w.clone(),
        "c_head.summary.bias": summary_b.clone(),
    }


def with_candidate_head(src: str | os.PathLike, out_dir: str | os.PathLike,
                        head: dict) -> Path:
    """A copy of the LenVM checkpoint `src` with `head` as its candidate_head.safetensors."""
    import shutil

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    shutil.copytree(src, out_dir)
    save_file({k: v.contiguous() for k, v in head.items()},
              str(out_dir / "candidate_head.safetensors"))
    return out_dir


def build_trunk_lenvm(out_dir: str | os.PathLike, base_dir: str | os.PathLike, *,
                      own_layers: int = 1, seed: int = 7) -> Path:
    """A LenVM that shares its leading layers with `base_dir` bit for bit, as one trained with
    `--train-last-layers own_layers` does: the base checkpoint with its last `own_layers`
    decoder layers and final norm redrawn, a random value head and a random candidate head."""
    import shutil

    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    shutil.copytree(base_dir, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    n, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    shard = out_dir / "model.safetensors"
    w = load_file(str(shard))
    g = torch.Generator().manual_seed(seed)
    own = tuple(f"model.layers.{i}." for i in range(n - own_layers, n))
    for name in list(w):
        if name.startswith(own) and w[name].dim() >= 2:
            w[name] = torch.randn(w[name].shape, generator=g) * 0.2
        elif name == "model.norm.weight" or (name.startswith(own) and w[name].dim() == 1):
            w[name] = 1.0 + 0.1 * torch.randn(w[name].shape, generator=g)
    w = {k: v for k, v in w.items() if not k.startswith("lm_head.")}
    save_file({k: v.contiguous() for k, v in w.items()}, str(shard), metadata={"format": "pt"})
    save_file(random_value_head(hidden, seed=seed), str(out_dir / "value_head.safetensors"))
    save_file(random_candidate_head(hidden, seed=seed + 1),
              str(out_dir / "candidate_head.safetensors"))
    return out_dir


def build_lenvm(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
                head_placement: str = "file", arch: str = "qwen2",
                head: Optional[dict[str, torch.Tensor]] = None, gamma: Optional[float] = None,
                **model_kwargs):
    """A LenVM checkpoint in the published layout.

    head_placement="file": backbone checkpoint + `value_head.safetensors` beside it.
    head_placement="shards": `v_head.*` tensors stored inside the backbone's own shards.
    head_placement="none": backbone only (must be refused when loaded as a LenVM).
    """
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    model = build_causal_lm(out_dir, tokenizer_dir, arch=arch, **model_kwargs)
    hidden = model.config.hidden_size
    head = head if head is not None else random_value_head(hidden)
    if head_placement == "file":
        save_file({k: v.contiguous() for k, v in head.items()},
                  str(out_dir / "value_head.safetensors"))
    elif head_placement == "shards":
        shard = out_dir / "model.safetensors"
        tensors = load_file(str(shard))
        tensors.update({k: v.contiguous() for k, v in head.items()})
        save_file(tensors, str(shard), metadata={"format": "pt"})
    elif head_placement != "none":
        raise ValueError(f"unknown head_placement {head_placement!r}")
    if gamma is not None:
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["lenvm_gamma"] = gamma
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir
