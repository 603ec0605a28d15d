"""A learned classifier for code, math and general: a linear model over byte n-grams, trained on the dev halves
of the labelled prompts and of the requests in words only (scripts/train_router_linear.py), selected by
`routing.classifier: linear`.

Why it is there: the rules were tuned on the dev half and make about twice as many errors on the held-out test
half as on text like it; a model of which byte sequences code, math and prose are made of generalises beyond the
cases someone wrote a rule for. On the held-out test half it makes about half the rules' errors and finds twice as
many of the requests for code written in words, at the rules' rate (`avocado-ray bench router` measures them side
by side; docs/usage.md, "Routing"). It reaches that rate by classifying a batch at once (`labels_of`, what the
router calls): one numpy pass over all the batch's n-grams instead of numpy calls per prompt, which cost two and a
half times the rules' time. Why it is not the default: its training data holds few everyday questions, and it
routes some of them as code ("What is the capital of Australia?", "Explain the difference between weather and
climate." of the demo prompts), which the rules do not.

Features (one definition, `batch_features`, used by training and inference): the prompt's UTF-8 bytes without its
links and e-mail addresses (as the rules see it: a changelog's authors are not code) and without the words that
open a question ("how do I", "can you", "what is the": they say that the prompt asks, not about what, and most
programming FAQs open with "how do I", so a model that read them called "How do I get to the station?" code), ASCII
lower-cased, continuation bytes dropped and each non-ASCII character reduced to one byte naming its script group
(Han, kana and CJK punctuation, Hangul, ...); each single byte one feature, each n-gram of 2-4 such bytes hashed
into 2**16 buckets; present or not (binary), L2-normalised. Chinese, and multimodal, come from the rules (the
script share of RuleClassifier), so a Chinese prompt around a command gets both labels. In a one-line request the
rules' vocabulary of requests for code (`RuleClassifier.asks_for_code`) is asked too: "write a function that ...",
"用 Python 写……" (the model sees Han characters as one script byte), which the labelled sets hold few of.
"""

from __future__ import annotations

import re
from importlib import resources

import numpy as np

from avocado_ray.routing.classifier import RuleClassifier, Surface
from avocado_ray.routing.textbytes import unlinked

WEIGHTS = "router_linear.npz"  # in avocado_ray/resources: weights (FEATURES x classes), intercept, classes
MAX_GRAM = 4
BUCKET_BITS = 16
FEATURES = (1 << BUCKET_BITS) + 128  # the hashed 2-4-gram buckets, then one column per single byte
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


BATCH_ROWS = 256  # prompts hashed together: the fastest measured (64-1024); their keys stay in the CPU's L2 cache
REQUEST_MAX_CHARS = 400
# The words that open a question ("how do i", "why doesn't my", "can you", "what is the"): they say that a prompt
# asks, not what about, and most programming FAQs open with "how do i"; left out of the features.
_QUESTION_FRAME = re.compile(
    rb"^\s*(?:(?:how|what|why|where|when|which|who|can|could|is|are|am|do|does|did|should|would|will|have|has|"
    rb"i|you|we|one|there|it|my|the|a|an|doesn't|don't|can't|isn't|aren't|won't|i'm|what's)(?:\s+|(?=[?]))){2,}"
)
_CROSSING = np.uint32(1 << 31)  # the bit that marks an n-gram running into the next prompt of the batch
_BUCKET_MASK = np.uint32((1 << BUCKET_BITS) - 1)


def batch_features(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The features of a batch of at most BATCH_ROWS prompts, computed at once: the row and the bucket of each
    prompt's distinct hashed 2-4-grams (by row, then bucket), and which of the 128 single bytes each prompt holds
    (a rows x 128 bool array). The prompts' bytes are joined, every n-gram hashed with its prompt's row above its
    bucket, those keys sorted once and their repeats dropped; the single bytes are few enough to count directly.

    Why a batch: numpy's cost per call is paid once per batch instead of once per prompt, which is what made the
    model cost two and a half times the rules' time per prompt when it classified prompts one by one."""
    reduced = [
        _QUESTION_FRAME.sub(b"", unlinked(text.encode("utf-8", "surrogatepass")).translate(_REDUCE, _CONTINUATION))
        for text in texts
    ]
    lengths = np.fromiter(map(len, reduced), np.int64, len(reduced))
    ends = np.cumsum(lengths)
    single = np.frombuffer(b"".join(reduced), np.uint8).astype(np.uint32)
    row = np.repeat(np.arange(len(texts), dtype=np.uint32) << np.uint32(BUCKET_BITS), lengths)
    singles = np.zeros((len(texts), 128), bool)
    singles.ravel()[(row >> np.uint32(BUCKET_BITS - 7)) | single] = True
    keys = np.empty((MAX_GRAM - 1) * len(single), np.uint32)
    used, grams = 0, single
    for n in range(2, MAX_GRAM + 1):  # in place where it can: the arrays are large and the steps few
        if n == 2:
            grams = (single[:-1] << np.uint32(7)) | single[1:]
        else:
            grams = grams[:-1]
            grams <<= np.uint32(7)
            grams |= single[n - 1 :]
        hashed = keys[used : used + len(grams)]
        np.bitwise_or(grams, _GRAM_TAGS[n], out=hashed)
        hashed *= _HASH_MULTIPLIER
        hashed >>= np.uint32(32 - BUCKET_BITS)
        hashed |= row[: len(grams)]
        # The n-grams that start in a prompt's last n - 1 bytes run into the next prompt: marked, sorted last, cut.
        crossing = (ends[:, None] - np.arange(1, n)).ravel()
        hashed[crossing[(crossing >= 0) & (crossing < len(hashed))]] |= _CROSSING
        used += len(grams)
    keys = np.sort(keys[:used])
    keys = keys[: np.searchsorted(keys, _CROSSING)]
    first = np.empty(len(keys), bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    keys = keys[first]
    return keys >> np.uint32(BUCKET_BITS), keys & _BUCKET_MASK, singles


def one_line_request(text: str) -> bool:
    """Whether a prompt is written as a request: one line of at most REQUEST_MAX_CHARS characters. Only there the
    rules' vocabulary of requests for code is asked; a longer text is judged by its shape alone."""
    return len(text) <= REQUEST_MAX_CHARS and "\n" not in text


def feature_columns(text: str) -> np.ndarray:
    """One prompt's features as the model's columns, sorted (what training reads): its distinct hashed 2-4-gram
    buckets, then 2**BUCKET_BITS + each single byte it holds."""
    _, buckets, singles = batch_features([text])
    return np.concatenate([buckets, (1 << BUCKET_BITS) + np.flatnonzero(singles[0]).astype(np.uint32)])


class LinearClassifier(RuleClassifier):
    """Code, math or general by the linear model; Chinese and multimodal by the rules."""

    def __init__(self) -> None:
        with resources.files("avocado_ray.resources").joinpath(WEIGHTS).open("rb") as fh:
            saved = np.load(fh)
            self._weights, self._intercept = saved["weights"], saved["intercept"]
            self._classes = [str(name) for name in saved["classes"]]
        self._single_weights = self._weights[1 << BUCKET_BITS :]

    def domains(self, texts: list[str]) -> list[str]:
        """The model's class of each prompt: code, math or general."""
        found = []
        for first in range(0, len(texts), BATCH_ROWS):
            batch = texts[first : first + BATCH_ROWS]
            rows, buckets, singles = batch_features(batch)
            starts = np.searchsorted(rows, np.arange(len(batch), dtype=rows.dtype))
            counts = np.diff(starts, append=len(rows))
            weights = self._weights.take(buckets, axis=0)
            # reduceat adds each prompt's run of rows; a prompt without n-grams gets its next one, hence * (counts > 0)
            sums = np.add.reduceat(weights, np.minimum(starts, max(len(rows) - 1, 0)), axis=0) if len(rows) else 0
            sums = sums * (counts > 0)[:, None] + singles.astype(np.float32) @ self._single_weights
            counts += singles.sum(1)
            scores = sums / np.sqrt(np.maximum(counts, 1))[:, None] + self._intercept
            found += [self._classes[i] for i in np.argmax(scores, 1)]
        return found

    def labels(self, text: str, has_image: bool = False) -> list[str]:
        return self.labels_of([text], [has_image])[0]

    def labels_of(self, texts: list[str], has_images: list[bool] | None = None) -> list[list[str]]:
        images = has_images or [False] * len(texts)
        return [self.labels_given(*each) for each in zip(texts, self.domains(texts), images)]

    def labels_given(
        self, text: str, domain: str, has_image: bool = False, vocabulary: bool | None = None
    ) -> list[str]:
        """A prompt's labels once the model gave its domain. `vocabulary`: whether the rules' vocabulary of requests
        for code is asked (by default in a one-line request; training's cross-validation compares the choices)."""
        labels = ["multimodal"] if has_image else []
        asks = one_line_request(text) if vocabulary is None else vocabulary
        if domain == "code" or (asks and self.asks_for_code(text, Surface(text))):
            labels.append("code")
        if domain == "math":
            labels.append("math")
        if not text.isascii() and self.is_chinese(text, text.encode("ascii", "replace"), text.encode()):
            labels.append("chinese")
        return labels or ["general"]
