"""A CLIP tokenizer whose merges are learned from the world's captions, built locally.

The random tiny model's tokenizer has CLIP's byte alphabet and no merges: one token per character,
so a 140-character world caption loses its scene and lighting past the 77-token limit. Here a few
hundred BPE merges, learned from the captions the usual way (merge the most frequent adjacent pair
until every caption word is one symbol), make each world word a single token; the byte alphabet
stays, so any other prompt still tokenizes (letter by letter).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

END = "</w>"
# The word split CLIPTokenizer's pre-tokenizer applies (letters, single digits, other runs).
_WORDS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table: printable bytes map to themselves, the rest above 255."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def learn_merges(texts: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges over the words of `texts`, most frequent pair first (ties: the smaller pair, so
    the result does not depend on dictionary order), until every word is one symbol."""
    counts = Counter(word for text in texts for word in _WORDS.findall(text.lower()))
    words = {tuple(w[:-1]) + (w[-1] + END,): n for w, n in counts.items()}
    merges = []
    while True:
        pairs: Counter = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = {}
        for symbols, n in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            joined[tuple(out)] = n
        words = joined


def build_world_tokenizer(texts: Iterable[str], max_length: int = 77):
    """A transformers CLIPTokenizer: the byte alphabet (alone and word-final), the merged symbols,
    the two special tokens."""
    from transformers import CLIPTokenizer

    merges = learn_merges(texts)
    chars = byte_alphabet()
    tokens = chars + [c + END for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
