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
CODE_SYMBOLS = "{}[];<>_|&#$\\"
CODE_SYMBOL_DENSITY = 0.03
# Substrings that, lower-cased, are almost never prose.
CODE_MARKERS = (
    "```", "#include", "def ", "=>", "();", "){", ") {", "};", "</", "/>", "#!/", "console.", "printf",
    "println", "print(", "std::", "self.", "this.", "elif ", "lambda", "func ", "fn ", "var ", "null",
    "++", "!=", "==", "\n    ", "\n\t", "import ", "return ",
)
# Words of a request about code, as a user writes it in English or Chinese.
CODE_REQUEST = re.compile(
    r"\b(python|javascript|typescript|java|rust|golang|kotlin|swift|ruby|php|perl|haskell|c\+\+|c#|sql|bash|"
    r"shell script|regex|html|css|json|yaml|api|git|pytest|unit test|compiler?|stack trace|traceback|"
    r"refactor|debug|function|algorithm|script|binary search|linked list|recursion|source code|snippet|"
    r"list comprehension|for loop|while loop|deadlock)\b"
    r"|代码|函数|编程|程序|脚本|算法",
)
# Words that make a prompt mathematical on their own, and words that do so only next to numbers.
MATH_WORDS = re.compile(
    r"\b(solve|simplify|derivative|integral|equation|prove|proof|theorem|polynomial|probability)\b|方程|证明|求解|概率"
)
MATH_WORDS_WITH_NUMBERS = re.compile(
    r"\b(calculate|compute|evaluate|expand|factor|prime|divisor|multiple|remainder|divided|times|sum|product|"
    r"round|convert|sequence|what is|how many|how much|percent|average)\b|计算|等于|多少",
)
MATH_SYMBOLS = re.compile(r"\d\s*[-+*/×÷^=]\s*[\d(a-z]|[a-z]\s*[*^]\s*\d|\d\s*/\s*\d")


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


def looks_like_code(text: str, lowered: str) -> bool:
    if any(marker in lowered for marker in CODE_MARKERS):
        return True
    if sum(map(text.count, CODE_SYMBOLS)) >= CODE_SYMBOL_DENSITY * len(text):
        return True
    return CODE_REQUEST.search(lowered) is not None


def looks_like_math(lowered: str) -> bool:
    if MATH_SYMBOLS.search(lowered) or MATH_WORDS.search(lowered):
        return True
    return MATH_WORDS_WITH_NUMBERS.search(lowered) is not None and any(ch.isdigit() for ch in lowered)


class RuleClassifier:
    """Rules over scripts, symbols and vocabulary: tens of thousands of prompts per second on one core."""

    def labels(self, text: str, has_image: bool = False) -> list[str]:
        lowered = text.lower()
        found = ["multimodal"] if has_image else []
        if looks_like_code(text, lowered):
            found.append("code")
        if chinese_share(text) >= CHINESE_SHARE:
            found.append("chinese")
        if looks_like_math(lowered):
            found.append("math")
        return found or ["general"]
