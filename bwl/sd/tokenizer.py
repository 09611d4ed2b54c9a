"""Word-level CLIP tokenizers for tiny and toy models (no download, transformers-5 safe)."""

from __future__ import annotations

import string
from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def word_tokenizer(words: Iterable[str], max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every given word is one token and any other text falls back to characters.

    It is built with ``CLIPTokenizer(vocab=..., merges=...)``: transformers 5 silently ignores ``vocab_file``.
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        if any(s not in vocab for s in symbols):
            raise ValueError(f"word {word!r} has characters outside [a-z0-9] and punctuation")
        head = symbols[0]
        for tail in symbols[1:]:
            if (head, tail) not in merges:
                merges.append((head, tail))
            head += tail
            add(head)
    tokenizer = _make(vocab, merges, max_length)
    for _ in range(8):
        broken = [w for w in words if len(tokenizer.tokenize(w.lower())) != 1]
        if not broken:
            return tokenizer
        for word in broken:
            pieces = tokenizer.tokenize(word.lower())
            head = pieces[0]
            for tail in pieces[1:]:
                merges.append((head, tail))
                head += tail
                add(head)
        tokenizer = _make(vocab, merges, max_length)
    raise RuntimeError(f"could not make single tokens of {broken[:5]}")


def _make(vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int) -> CLIPTokenizer:
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS
    )
    tokenizer.model_max_length = max_length
    return tokenizer
