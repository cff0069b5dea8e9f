"""The text the tokenizer is trained on, generated rather than downloaded."""

from __future__ import annotations

import random

# Syllable pieces for pseudo-words. Many distinct multi-syllable words give BPE enough distinct
# pairs to reach a 32000-token vocabulary from a few MB of text.
_ONSETS = (
    "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "br", "ch", "cl", "dr", "fl", "gr", "kr", "pl", "qu", "sh", "sk", "sp", "st", "th", "tr",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "oo", "ou", "ie")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "st", "nd", "x")
_SYLLABLES_PER_WORD = (1, 1, 2, 2, 2, 3, 3, 4)
_SENTENCE_ENDS = ".....?!"

# Real text so common English words, digits, newlines and code-ish punctuation get tokens too.
_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A serving engine splits prefill from decode:
the prefill pool reads the whole prompt at once, and the decode pool writes one token at a
time for many requests together. Each request keeps its keys and values in fixed-size blocks,
so memory is shared without copying. What time is it? It is 12:45 on Monday, 3 June 2024.
Hello, world! Please answer the question below, briefly and clearly.
def add(a, b):
    return a + b  # {"key": [1, 2, 3], "ok": true}
"""


def synthetic_corpus(vocab_size: int, seed: int = 0) -> list[str]:
    """Deterministic text: Zipf-distributed pseudo-words in sentences, plus fixed English.

    Only `random.Random(seed)` drives it, so it is the same on every machine and Python build.
    """
    rng = random.Random(seed)
    syllables = sorted({o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS})
    # Twice as many words as tokens: BPE then has more whole words than it can give ids to,
    # so it always reaches the requested size.
    lexicon_size = 2 * vocab_size
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < lexicon_size:
        n = rng.choice(_SYLLABLES_PER_WORD)
        word = "".join(rng.choice(syllables) for _ in range(n))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    cum_weights: list[float] = []
    total = 0.0
    for rank in range(lexicon_size):
        total += 1.0 / (rank + 2.7)  # Zipf-Mandelbrot, exponent 1
        cum_weights.append(total)
    n_words = 12 * vocab_size
    words = rng.choices(lexicon, cum_weights=cum_weights, k=n_words)
    lines: list[str] = []
    i = 0
    while i < n_words:
        n = rng.randint(4, 16)
        sentence = words[i : i + n]
        i += n
        sentence[0] = sentence[0].capitalize()
        if len(sentence) > 6 and rng.random() < 0.3:
            sentence[len(sentence) // 2] += ","
        if rng.random() < 0.1:
            sentence.insert(rng.randrange(len(sentence) + 1), str(rng.randrange(1000)))
        lines.append(" ".join(sentence) + rng.choice(_SENTENCE_ENDS))
    # Weighted so the English words win merges over rare pseudo-words.
    english = _ENGLISH.splitlines(keepends=True)
    lines.extend(english * max(1, vocab_size // 100))
    return lines
