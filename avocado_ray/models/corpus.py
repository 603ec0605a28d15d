"""Real text that ships with Python itself, so tiny tokenizers can be trained with no download.

Code comes from the standard library's sources, English from the prose of its help topics, Chinese from its
codec test data. Each family's tokenizer is trained on a different mix, as real teachers are.
"""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])

# Used only where the interpreter ships without its `test` package (Debian's python3 does).
_CHINESE_FALLBACK = (
    "机器学习是人工智能的一个分支。它研究计算机怎样模拟或实现人类的学习行为，以获取新的知识或技能。"
    "蒸馏是一种把大模型的知识传给小模型的方法，学生模型学习教师模型的回答。"
)


def code_corpus(max_chars: int = 2_000_000) -> str:
    """Python source files of the standard library, in a stable order."""
    parts, size = [], 0
    for path in sorted(STDLIB.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n".join(parts)


# A line of prose: a letter, quote, `(` or `*` first, and none of the marks of tables, grammar rules,
# interpreter sessions or most code (`|`, `::=`, `>>>`, `=`, `_`, brackets, braces, ...).
PROSE_LINE = re.compile(r"[A-Za-z\"'(*][^|<>{}\[\]=_\\#@$]*")


def english_corpus() -> str:
    """The prose of the interactive `help()`'s topics: English about Python, each line stripped of its indent,
    without the grammar rules, tables and most of the code among them (a tiny model trained on those writes
    their notation whatever it is asked)."""
    from pydoc_data.topics import topics

    lines = (line.strip() for key in sorted(topics) for line in topics[key].splitlines())
    return "\n".join(line for line in lines if PROSE_LINE.fullmatch(line) and len(line.split()) >= 3)


def chinese_corpus() -> str:
    """Chinese sample text from the standard library's codec tests."""
    folder = STDLIB / "test" / "cjkencodings"
    texts = [path.read_text(encoding="utf-8") for path in sorted(folder.glob("gb*-utf8.txt"))]
    return "\n".join(texts) if texts else _CHINESE_FALLBACK
