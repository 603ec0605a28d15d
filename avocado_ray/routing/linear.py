"""A learned classifier for code, math and general: a linear model over hashed byte n-grams, trained on the dev
half of the labelled prompts only (scripts/train_router_linear.py), selected by `routing.classifier: linear`.

Why it is there: the rules were tuned on the dev half and make about twice as many errors on the held-out test
half as on text like it (`avocado-ray bench router` measures both side by side; docs/usage.md, "Routing"); a model
of which byte sequences code, math and prose are made of generalises beyond the cases someone wrote a rule for.
Why it is not the default: it costs about two and a half times the rules' time per prompt (numpy calls per
prompt), below the rate the default must keep.

Features (one definition, used by training and inference): the prompt's UTF-8 bytes without its links and e-mail
addresses (as the rules see it: a changelog's authors are not code), ASCII lower-cased, the
continuation bytes dropped and each non-ASCII character reduced to one byte naming its script group (Han, kana and
CJK punctuation, Hangul, ...); every n-gram of 1-4 such bytes hashed into 2**16 buckets; present or not (binary),
L2-normalised. Chinese, and multimodal, still come from the rules (the script share of RuleClassifier); the model
decides code, math or general, so a Chinese prompt around a command gets both labels. The labelled sets hold code
as snippets, so a request for code in words ("write a Python function that...") is left to the rules' vocabulary
(`RuleClassifier.asks_for_code`): code when either finds it.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from avocado_ray.routing.classifier import RuleClassifier, Surface
from avocado_ray.routing.textbytes import unlinked

WEIGHTS = "router_linear.npz"  # in avocado_ray/resources: weights (buckets x classes), intercept, classes
MAX_GRAM = 4
BUCKET_BITS = 16
_HASH_MULTIPLIER = np.uint32(0x9E3779B1)  # Fibonacci hashing: the top bits of key * this are the bucket
# Lead bytes to one byte per script group: C2-DF (Latin-1, Greek, Cyrillic...) 1, E0-E3 (CJK punctuation, kana)
# 2, E4-E9 (Han) 3, EA-ED (Hangul) 4, EE-EF (private use, full-width forms) 5, F0-FF (emoji, rare Han) 6.
_SCRIPT_GROUPS = ((0xC0, 0xDF, 1), (0xE0, 0xE3, 2), (0xE4, 0xE9, 3), (0xEA, 0xED, 4), (0xEE, 0xEF, 5), (0xF0, 0xFF, 6))
_REDUCE = bytes(
    c + 32 if 65 <= c <= 90 else next((group for low, high, group in _SCRIPT_GROUPS if low <= c <= high), c)
    for c in range(256)
)
_CONTINUATION = bytes(range(0x80, 0xC0))
# An n-gram's key: its bytes in base 128 (ASCII fits; 4 x 7 bits), n above them, so n-grams of different n differ.
_GRAM_TAGS = [np.uint32(n << 28) for n in range(MAX_GRAM + 1)]


def gram_buckets(text: str) -> np.ndarray:
    """The bucket of each byte n-gram of a prompt without its links and e-mail addresses (uint32, with repeats)."""
    utf8 = unlinked(text.encode("utf-8", "surrogatepass"))
    single = np.frombuffer(utf8.translate(_REDUCE, _CONTINUATION), np.uint8).astype(np.uint32)
    grams, parts = single, [single | _GRAM_TAGS[1]]
    for n in range(2, min(MAX_GRAM, len(single)) + 1):
        grams = (grams[:-1] << np.uint32(7)) | single[n - 1 :]
        parts.append(grams | _GRAM_TAGS[n])
    return (np.concatenate(parts) * _HASH_MULTIPLIER) >> np.uint32(32 - BUCKET_BITS)


def feature_buckets(text: str) -> np.ndarray:
    """The prompt's features: its distinct n-gram buckets (binary features), sorted."""
    return np.unique(gram_buckets(text))


class LinearClassifier(RuleClassifier):
    """Code, math or general by the linear model; Chinese and multimodal by the rules."""

    def __init__(self) -> None:
        with resources.files("avocado_ray.resources").joinpath(WEIGHTS).open("rb") as fh:
            saved = np.load(fh)
            self._weights, self._intercept = saved["weights"], saved["intercept"]
            self._classes = [str(name) for name in saved["classes"]]

        # Scratch for the distinct buckets without a sort: each bucket remembers the last position that wrote it,
        # and a position is kept where that is its own (one per bucket; the same set as feature_buckets).
        self._last_position = np.zeros(1 << BUCKET_BITS, np.int64)
        self._positions = np.arange(1 << BUCKET_BITS)

    def domain(self, text: str) -> str:
        """The model's class of a prompt: code, math or general."""
        buckets = gram_buckets(text)
        if not len(buckets):
            return self._classes[int(np.argmax(self._intercept))]
        positions = self._positions[: len(buckets)] if len(buckets) <= len(self._positions) else np.arange(len(buckets))
        self._last_position[buckets] = positions
        distinct = buckets[self._last_position[buckets] == positions]
        scores = self._weights.take(distinct, axis=0).sum(0) / np.float32(np.sqrt(len(distinct))) + self._intercept
        return self._classes[int(np.argmax(scores))]

    def labels(self, text: str, has_image: bool = False) -> list[str]:
        surface = Surface(text)
        found = ["multimodal"] if has_image else []
        domain = self.domain(text)
        if domain == "code" or self.asks_for_code(text, surface):
            found.append("code")
        if domain == "math":
            found.append("math")
        if self.chinese(text, surface):
            found.append("chinese")
        return found or ["general"]
