"""Domain classification of prompts: fast rules, no model, no download.

A prompt gets every label whose rule fires (Chinese + code is common); the routing table's
priority decides which label routes it. `general` is given when no other label fires.
"""

from __future__ import annotations

import re
from typing import Protocol

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LETTER = re.compile(r"[^\W\d_]")
CHINESE_SHARE = 0.3  # share of letters that are CJK ideographs for a prompt to be "mainly Chinese"

CODE_PATTERNS = re.compile(
    r"```"
    r"|^\s*(def|class|import|from|fn|func|function|public|private|static|package|#include|let|const|var)\b"
    r"|\b(def|fn|func|function)\s+\w+\s*\("
    r"|=>|::|->|\)\s*\{|;\s*$|\w+\(\)|`[^`]+`"
    r"|\b(python|javascript|typescript|java|rust|golang|go code|c\+\+|c#|sql|bash|shell script|regex|"
    r"html|css|json|yaml|api|git|pytest|unit test|compile|compiler|stack trace|traceback|refactor|"
    r"function|method|variable|bug|debug|algorithm|script|query|class|implement|binary search|linked list|"
    r"list comprehension|recursion|for loop|while loop|in c)\b"
    r"|代码|函数|编程|程序|脚本|算法",
    re.IGNORECASE | re.MULTILINE,
)
MATH_PATTERNS = re.compile(
    r"\d+(\.\d+)?\s*[-+*/×÷^=]\s*\d+"
    r"|\b(solve|prove|proof|equation|integral|derivative|theorem|probability|how many|how much|"
    r"what is \d+|times|divided by|percent|average|sum of|product of|remainder|prime|fraction|polynomial)\b"
    r"|方程|计算|证明|求解|多少|几个|概率|等于",
    re.IGNORECASE,
)


class DomainClassifier(Protocol):
    """What the router needs from a classifier: the labels of one prompt."""

    def labels(self, text: str, has_image: bool = False) -> list[str]: ...


class RuleClassifier:
    """Regular expressions over the prompt text; thousands of prompts per millisecond-scale batch."""

    def labels(self, text: str, has_image: bool = False) -> list[str]:
        found = []
        if has_image:
            found.append("multimodal")
        if CODE_PATTERNS.search(text):
            found.append("code")
        letters = len(LETTER.findall(text))
        if letters and len(CJK.findall(text)) / letters >= CHINESE_SHARE:
            found.append("chinese")
        if MATH_PATTERNS.search(text):
            found.append("math")
        return found or ["general"]
