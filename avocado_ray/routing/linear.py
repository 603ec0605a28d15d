"""The default classifier of code, math and general: a linear model over byte n-grams, trained on the dev halves
of the labelled prompts, of the requests in words and on Debian changelog paragraphs only
(scripts/train_router_linear.py); `routing.classifier: linear`.

Why a model: the rules were tuned on the dev half and make three times as many errors on the held-out test half as
on text like it; a model of which byte sequences code, math and prose are made of generalises beyond the cases
someone wrote a rule for. On the held-out test half it meets the 98% targets the rules miss, finds half again as
many of the requests for code written in words and most word problems, and runs at about 1.5 times the rules'
rate (`avocado-ray bench router` measures them side by side; docs/usage.md, "Routing"). It reaches that rate by
classifying a batch at once (`labels_of`, what the router calls): a few numpy passes over all the batch's bytes
instead of numpy calls per prompt (which cost two and a half times the rules' time), and grams counted rather than
deduplicated, so that nothing is sorted.

Features (one definition, `batch_features`, used by training and inference): the prompt's UTF-8 bytes without its
links and e-mail addresses (as the rules see it: a changelog's authors are not code) and without the words that
open a question ("how do I", "can you", "what is the": they say that the prompt asks, not about what, and most
programming FAQs open with "how do I", so a model that read them called "How do I get to the station?" code), ASCII
lower-cased, continuation bytes dropped and each non-ASCII character reduced to one byte naming its script group
(Han, kana and CJK punctuation, Hangul, ...); each single byte present one feature, each 2-, 3- and 4-gram of such
bytes (and those that end the prompt) hashed into 2**16 buckets and counted; divided by the square root of the
number of grams and bytes. Chinese, and multimodal, come from the rules (the script share of RuleClassifier), so a
Chinese prompt around a command gets both labels. In a one-line request the rules' vocabulary of requests for code
(`RuleClassifier.asks_for_code`) is asked too: "write a function that ...", "用 Python 写……" (the model sees Han
characters as one script byte), which the labelled sets hold few of.
"""

from __future__ import annotations

import re
from importlib import resources

import numpy as np

from avocado_ray.routing.classifier import RuleClassifier, Surface, has_code_marker
from avocado_ray.routing.textbytes import unlinked

WEIGHTS = "router_linear.npz"  # in avocado_ray/resources: weights (FEATURES x classes), intercept, classes
MAX_GRAM = 4  # the bytes of the uint32 word that batch_features reads at each position: its longest gram
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
# Dropped: UTF-8 continuation bytes, and NUL and DEL (a 3-gram ending in NUL would be its 2-gram; DEL pads).
_DROPPED = b"\x00\x7f" + bytes(range(0x80, 0xC0))


BATCH_ROWS = 256  # prompts hashed together: as fast as 512 or 1000 (measured; 64: 8% slower), smaller arrays
REQUEST_MAX_CHARS = 400
# The words that open a question ("how do i", "why doesn't my", "can you", "what is the"): they say that a prompt
# asks, not what about, and most programming FAQs open with "how do i"; left out of the features.
_QUESTION_FRAME = re.compile(
    rb"^\s*(?:(?:how|what|why|where|when|which|who|can|could|is|are|am|do|does|did|should|would|will|have|has|"
    rb"i|you|we|one|there|it|my|the|a|an|doesn't|don't|can't|isn't|aren't|won't|i'm|what's)(?:\s+|(?=[?]))){2,}"
)
_PADDING = b"\x7f" * (MAX_GRAM - 1)  # after each prompt (DEL, dropped from the text): no gram runs into the next
_GRAM_MASKS = [np.uint32((1 << 8 * n) - 1) for n in range(2, MAX_GRAM + 1)]  # the first n bytes of a 4-byte word


def batch_features(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The features of a batch of prompts, computed at once: the bucket of every 2-, 3- and 4-gram starting at each
    position of the joined batch (a (MAX_GRAM - 1) x positions array), where each prompt's positions start and end
    (`bounds`: start, end, start, end, ...), and which of the 128 single bytes each prompt holds (rows x 128 bool).

    The prompts' bytes are joined, each followed by MAX_GRAM - 1 bytes of _PADDING; the four bytes from each
    position, read as one little-endian uint32, are its 4-gram, and masked to two or three bytes its 2- and 3-grams.
    A gram that runs into the padding marks the end of its prompt ("ends with '?'"); those that start in the
    padding are not the prompt's and lie outside its bounds. Grams are counted, not deduplicated, so no sort is
    needed: numpy's cost is a few passes over the batch's bytes, once per batch instead of once per prompt."""
    reduced = [
        _QUESTION_FRAME.sub(b"", unlinked(text.encode("utf-8", "surrogatepass")).translate(_REDUCE, _DROPPED))
        for text in texts
    ]
    rows = len(texts)
    joined = b"".join(prompt + _PADDING for prompt in reduced)
    lengths = np.fromiter(map(len, reduced), np.int64, rows)
    bounds = np.empty(2 * rows, np.int64)
    bounds[0::2] = np.arange(rows) * (MAX_GRAM - 1) + np.cumsum(lengths) - lengths
    bounds[1::2] = bounds[0::2] + lengths
    data = np.frombuffer(joined, np.uint8)
    owner = np.repeat(np.arange(rows, dtype=np.int64) << 7, lengths + (MAX_GRAM - 1))
    singles = np.zeros((rows, 128), bool)
    singles.ravel()[owner | data] = True
    singles[:, _PADDING[0]] = False  # the padding is no byte of the prompts
    positions = max(len(joined) - (MAX_GRAM - 1), 0)
    words = np.ndarray((positions,), "<u4", joined, 0, (1,))  # the 4 bytes from each position (unaligned reads)
    buckets = np.empty((MAX_GRAM - 1, positions), np.uint32)
    for mask, row in zip(_GRAM_MASKS, buckets):
        np.bitwise_and(words, mask, out=row)
    buckets *= _HASH_MULTIPLIER
    buckets >>= np.uint32(32 - BUCKET_BITS)
    return buckets, bounds, singles


def one_line_request(text: str) -> bool:
    """Whether a prompt is written as a request: one line of at most REQUEST_MAX_CHARS characters. Only there the
    rules' vocabulary of requests for code is asked; a longer text is judged by its shape alone."""
    return len(text) <= REQUEST_MAX_CHARS and "\n" not in text


def feature_columns(text: str) -> np.ndarray:
    """One prompt's features as the model's columns (what training reads): the bucket of each of its grams, a
    bucket as often as grams fall into it, then 2**BUCKET_BITS + each single byte it holds."""
    buckets, bounds, singles = batch_features([text])
    return np.concatenate(
        [buckets[:, : bounds[1]].ravel(), (1 << BUCKET_BITS) + np.flatnonzero(singles[0]).astype(np.uint32)]
    )


class LinearClassifier(RuleClassifier):
    """Code, math or general by the linear model; Chinese and multimodal by the rules."""

    def __init__(self) -> None:
        with resources.files("avocado_ray.resources").joinpath(WEIGHTS).open("rb") as fh:
            saved = np.load(fh)
            weights, intercept = saved["weights"], saved["intercept"]
            self._classes = [str(name) for name in saved["classes"]]
        # Only the argmax counts: each class's weights less the first class's (one fewer column to gather), each
        # class a contiguous row, so that a gather reads a quarter of a megabyte that stays in the cache.
        margins = (weights[:, 1:] - weights[:, :1]).T
        self._gram_margins = [np.ascontiguousarray(row[: 1 << BUCKET_BITS]) for row in margins]
        self._single_margins = np.ascontiguousarray(margins[:, 1 << BUCKET_BITS :].T)
        self._intercept_margins = intercept[1:] - intercept[0]

    def domains(self, texts: list[str]) -> list[str]:
        """The model's class of each prompt: code, math or general."""
        found = []
        for first in range(0, len(texts), BATCH_ROWS):
            batch = texts[first : first + BATCH_ROWS]
            buckets, bounds, singles = batch_features(batch)
            lengths = bounds[1::2] - bounds[0::2]
            # reduceat adds each prompt's positions (bound to bound; an empty prompt gets its next one, hence * 0)
            edges = np.minimum(bounds[:-1], max(buckets.shape[1] - 1, 0))
            margins = np.zeros((len(batch), len(self._classes)), np.float32)
            for column, gram_margins in enumerate(self._gram_margins, 1):
                per_position = gram_margins.take(buckets[0])
                for longer_grams in buckets[1:]:
                    per_position += gram_margins.take(longer_grams)
                if len(per_position):
                    margins[:, column] = np.add.reduceat(per_position, edges)[0::2] * (lengths > 0)
            margins[:, 1:] += singles.astype(np.float32) @ self._single_margins
            counts = (MAX_GRAM - 1) * lengths + singles.sum(1)
            margins[:, 1:] = margins[:, 1:] / np.sqrt(np.maximum(counts, 1))[:, None] + self._intercept_margins
            found += [self._classes[i] for i in np.argmax(margins, 1)]
        return found

    def labels(self, text: str, has_image: bool = False) -> list[str]:
        return self.labels_of([text], [has_image])[0]

    def labels_of(self, texts: list[str], has_images: list[bool] | None = None) -> list[list[str]]:
        images = has_images or [False] * len(texts)
        return [self.labels_given(*each) for each in zip(texts, self.domains(texts), images)]

    def _code_by_rules(self, text: str, surface: Surface, asks: bool) -> bool:
        """Code the model did not see: a substring that is almost never prose (a code fence, `=>`, `#include`), or
        in a request, code asked for in words."""
        return has_code_marker(surface.data) or (asks and self.asks_for_code(text, surface))

    def labels_given(
        self, text: str, domain: str, has_image: bool = False, vocabulary: bool | None = None
    ) -> list[str]:
        """A prompt's labels once the model gave its domain. `vocabulary`: whether the rules' vocabulary of requests
        for code is asked (by default in a one-line request; training's cross-validation compares the choices)."""
        labels = ["multimodal"] if has_image else []
        asks = one_line_request(text) if vocabulary is None else vocabulary
        if domain == "code" or self._code_by_rules(text, Surface(text), asks):
            labels.append("code")
        if domain == "math":
            labels.append("math")
        if not text.isascii() and self.is_chinese(
            text, text.encode("ascii", "replace"), text.encode("utf-8", "surrogatepass")
        ):
            labels.append("chinese")
        return labels or ["general"]
