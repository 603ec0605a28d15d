"""Domain classification of prompts: fast rules over Unicode scripts and surface features, no model.

A prompt gets every label whose rule fires (Chinese + code is common); the routing table's priority
decides which label routes it, and `general` is given when no other label fires.

Why rules and not a library: Chinese is identified by its script (Han ideographs without Japanese kana),
which is exact for this purpose and costs a microsecond; language-identification libraries (langid,
lingua, fastText's lid model) answer a harder question (which of 100+ languages) 100x slower, and
fastText's model would be a download. Code and math are recognised by their symbols and vocabulary.
Users with a trained classifier plug it in through the `DomainClassifier` protocol.
"""

from __future__ import annotations

import re
from typing import Protocol

HAN_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
KANA = re.compile(r"[\u3040-\u30ff]")
CHINESE_SHARE = 0.3  # Han characters among non-space characters for a prompt to be "mainly Chinese"

# Characters that are frequent in source code and rare in prose (math's + - * / = ( ) are left out).
CODE_SYMBOLS = b"{}[];<>_|&#$\\"
CODE_SYMBOL_DENSITY = 0.03
# Substrings that, lower-cased, are almost never prose: symbol runs (one regex whose branches all start
# with a symbol, which the regex engine scans for quickly) and keywords.
CODE_SYMBOL_MARKERS = re.compile(r'```|#include|#!/|=>|\(\);|\) ?\{|\};|</|/>|::|\+\+|!=|==|/\*|\*/| // |:-|\("')
# ("std::" needs no keyword entry: "::" above catches it.)
CODE_MARKERS = ("def ", "elif ", "lambda", "func ", "fn ", "var ", "null", "printf", "println", "print(", "console.")
# Line shapes of code (a line that ends in one of these, or starts with one of those).
CODE_LINE_ENDS = ("{", "}", ")", "(", "=", "[", "]", " then", " do", "end")
CODE_LINE_STARTS = ("#", "//", "(", "!", "}", "<", "@", "end", "if ", "let ", "open ", "import ", "return")
CODE_LINE_SHARE = 0.5
# Vocabulary, checked against the prompt's set of lower-case words (one tokenisation per prompt).
CODE_WORDS = frozenset(
    "python javascript typescript java rust golang kotlin swift ruby php perl haskell c++ c# sql bash regex html "
    "css json yaml api git pytest compile compiler traceback refactor debug function algorithm script recursion "
    "snippet deadlock".encode().split()
)
CODE_PHRASES = ("shell script", "unit test", "stack trace", "binary search", "linked list", "source code",
                "list comprehension", "for loop", "while loop")
CODE_HAN = ("代码", "函数", "编程", "脚本", "算法", "源程序")
# Words that make a prompt mathematical on their own, and words that do so only next to numbers.
MATH_WORDS = frozenset(
    "derivative integral equation prove proof theorem polynomial probability prob composite".encode().split()
)
MATH_PHRASES = ("without replacement", "ascending order", "descending order", "decreasing order", "increasing order",
                "(base ", " base ")
MATH_HAN = ("方程", "证明", "求解", "概率")
MATH_WORDS_WITH_NUMBERS = frozenset(
    "solve simplify calculate compute evaluate expand factor prime divisor multiple remainder divide divided times "
    "sum product round convert sequence percent average biggest smallest greater smaller sort determine total".encode().split()
)
MATH_PHRASES_WITH_NUMBERS = ("what is", "how many", "how much", "put together", "work out", "what comes next")
MATH_HAN_WITH_NUMBERS = ("计算", "等于", "多少")
MATH_DIGIT_SHARE = 0.02  # numbers must be a visible part of the prompt, not one date in a story
# Arithmetic between numbers (or a number and a variable), and powers; every branch starts at a digit or
# an operator so the regex engine can skip ahead quickly.
MATH_SYMBOLS = re.compile(r"\d\s*(?:[-+*/×÷^=]\s*-?[\d(a-z]|/\s*\d)|(?:\*\*|\^)\s*\d")

# bytes.translate keeps letters, digits, + and #; everything else becomes a space: a fast word split.
_WORD_BYTES = bytes(c if chr(c).isalnum() or chr(c) in "+#" else 32 for c in range(128)) + b" " * 128


def words_of(ascii_lowered: bytes) -> set[bytes]:
    return set(ascii_lowered.translate(_WORD_BYTES).split())


def count_of(data: bytes, characters: bytes) -> int:
    """How many bytes of `data` are among `characters` (bytes.translate runs in C)."""
    return len(data) - len(data.translate(None, characters))


class DomainClassifier(Protocol):
    """What the router needs from a classifier: the labels of one prompt."""

    def labels(self, text: str, has_image: bool = False) -> list[str]: ...


def chinese_share(text: str) -> float:
    """Share of Han characters among non-space characters; 0 for Japanese (kana) and ASCII text."""
    if text.isascii() or KANA.search(text):
        return 0.0
    han = sum(map(len, HAN_RUN.findall(text)))
    visible = len(text) - text.count(" ") - text.count("\n")
    return han / max(visible, 1)


def code_line_share(text: str) -> float:
    """Share of lines shaped like code: ending in a bracket or separator, or opening with a comment or keyword."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 3:
        return 0.0
    return sum(1 for line in lines if line.endswith(CODE_LINE_ENDS) or line.startswith(CODE_LINE_STARTS)) / len(lines)


def _any_in(text: str, parts: tuple[str, ...]) -> bool:
    return any(part in text for part in parts)


def looks_like_code(text: str, lowered: str, ascii_text: bytes, words: set[bytes]) -> bool:
    if not words.isdisjoint(CODE_WORDS) or CODE_SYMBOL_MARKERS.search(lowered) or _any_in(lowered, CODE_MARKERS):
        return True
    if _any_in(lowered, CODE_PHRASES):
        return True
    if count_of(ascii_text, CODE_SYMBOLS) >= CODE_SYMBOL_DENSITY * len(text):
        return True
    if "\n" in text and code_line_share(text) >= CODE_LINE_SHARE:
        return True
    return not text.isascii() and _any_in(text, CODE_HAN)


def looks_like_math(lowered: str, ascii_lowered: bytes, words: set[bytes]) -> bool:
    han = not lowered.isascii()
    if not words.isdisjoint(MATH_WORDS) or _any_in(lowered, MATH_PHRASES) or (han and _any_in(lowered, MATH_HAN)):
        return True
    digits = count_of(ascii_lowered, b"0123456789")
    if not digits:
        return False
    if MATH_SYMBOLS.search(lowered):
        return True
    return digits >= MATH_DIGIT_SHARE * len(lowered) and (
        not words.isdisjoint(MATH_WORDS_WITH_NUMBERS)
        or _any_in(lowered, MATH_PHRASES_WITH_NUMBERS)
        or (han and _any_in(lowered, MATH_HAN_WITH_NUMBERS))
    )


ENTRY_POINT_GROUP = "avocado_ray.classifiers"


def load_classifier(name: str) -> DomainClassifier:
    """The classifier an installed package registers under `name` in the `avocado_ray.classifiers` entry points.

    Only installed entry points can be named (avocado-ray registers `rules`): a config string is never
    imported as a module path.
    """
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise ValueError(f"no classifier {name!r} among the installed {ENTRY_POINT_GROUP} entry points {sorted(found)}")
    return found[name].load()()


class RuleClassifier:
    """Rules over scripts, symbols and vocabulary: tens of thousands of prompts per second on one core."""

    def labels(self, text: str, has_image: bool = False) -> list[str]:
        lowered = text.lower()
        ascii_text = text.encode("ascii", "ignore")
        ascii_lowered = ascii_text.lower()
        words = words_of(ascii_lowered)
        found = ["multimodal"] if has_image else []
        if looks_like_code(text, lowered, ascii_text, words):
            found.append("code")
        if chinese_share(text) >= CHINESE_SHARE:
            found.append("chinese")
        if looks_like_math(lowered, ascii_lowered, words):
            found.append("math")
        return found or ["general"]
