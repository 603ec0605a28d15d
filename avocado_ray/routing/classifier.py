"""Domain classification of prompts: fast rules over Unicode scripts and surface features, no model.

A prompt gets every label whose rule fires (Chinese + code is common); the routing table's priority
decides which label routes it, and `general` is given when no other label fires.

Chinese is identified by its script: Han ideographs of every CJK block, traditional or simplified, against the
prompt's Latin words, Hangul and kana (CHINESE_SHARE); Japanese by its kana letters, not by the ・ or ー that
Chinese text uses too. Why the Chinese rule rather than a language-identification library: on the held-out set
it is as accurate as Lingua and more accurate than CLD2, and faster than both (`avocado-ray bench router` measures
them on the same prompts; the figures are in docs/usage.md, "Routing"). The libraries are there as the `cld2` and
`lingua` classifiers (avocado_ray/routing/langid.py). The default, `linear` (avocado_ray/routing/linear.py),
keeps the Chinese rule and the vocabulary of requests for code and decides code, math and prose by a trained model,
which makes fewer errors on the held-out set than the code and math rules here; others plug in through the
`DomainClassifier` protocol. Here code and math are
recognised by their symbols and vocabulary (the math rule is avocado_ray/routing/mathrule.py), and a command line
of ASCII in a CJK prompt is code (a manual page around a shell command gets both labels). What only looks like
code or math is left out: links and e-mail addresses (a changelog's authors), a language's name inside a package
or path name (python3-apt, /usr/share/java), a programming name in CJK prose that asks for no code, a path pattern
(debian/*), issue numbers, versions and times of day with their zone.

Why it is fast (tens of microseconds at most for a prompt of a few hundred characters on one core): the rules but
the script ones look at one ASCII encoding of the prompt, and each step is one C-level pass (bytes.translate to
split words, to map digits and letters or to count characters; set intersections; regexes whose branches all
start with a literal, so that the engine skips to the candidates). Vocabulary is checked on the prompt's set of
words, phrases only when one of their words is in it, and the cheap rules run first.
"""

from __future__ import annotations

import re
from typing import Protocol

from avocado_ray.config import CLASSIFIER_ENTRY_POINTS
from avocado_ray.routing.mathrule import MATH_VOCABULARY, math_rule
from avocado_ray.routing.textbytes import count
from avocado_ray.routing.textbytes import unlinked as _unlinked

# Chinese by script. A prompt is Chinese when Han ideographs are at least CHINESE_SHARE of its words: Han
# characters, Latin-script words, Hangul syllables and kana letters, each counted as one. Digits, punctuation
# (CJK, full-width or ASCII), box drawing, spaces of any kind and other layout characters count for nothing, so
# a manual's tables and section numbers do not dilute its Chinese, and a Latin word weighs about what a Han
# character does (a Chinese word is one or two), so a few Han names in an English paragraph do not make it
# Chinese while a few Han characters around a product name do. Traditional and simplified are both Han.
CHINESE_SHARE = 0.5
CHINESE_MIN_HAN = 2
# Han ideographs in every CJK block. Counted on the UTF-8 bytes, lead bytes E4-E9 start exactly U+4000-U+9FFF
# (the unified ideographs and most of extension A); the rest of extension A (U+3400-U+3FFF), the compatibility
# ideographs (U+F900-U+FAFF) and extensions B-H (U+20000-U+323AF) are rare, and counted by a character class
# once a search finds one (a search builds nothing; counting every Han character that way would cost more).
HAN_LEAD_BYTES = bytes(range(0xE4, 0xEA))
RARE_HAN = re.compile("[\u3400-\u3fff\uf900-\ufaff\U00020000-\U000323af]")
# Lead bytes EA-ED start U+A000-U+DFFF: the Hangul syllables (U+AC00-U+D7A3) and a few rare scripts.
HANGUL_LEAD_BYTES = bytes(range(0xEA, 0xEE))
# Japanese: kana LETTERS (hiragana U+3041-U+3096, katakana U+30A1-U+30FA). The katakana middle dot ・ (U+30FB)
# and the prolonged sound mark ー (U+30FC) are punctuation that Chinese text uses too (《念奴娇・赤壁怀古》).
KANA_LETTER = re.compile(rb"\xe3(?:\x81[\x81-\xbf]|\x82[\x80-\x96\xa1-\xbf]|\x83[\x80-\xba])")
# Two kana letters make a prompt Japanese (one may be a quoted の in a Chinese shop name).

# Characters that are frequent in source code and rare in prose (math's + - * / = ( ) are left out): code when
# they are 3% of the prompt's UTF-8 bytes (a Han character weighs 3) and at least 4 (a short quote with "#1" or
# "$25" is prose).
CODE_SYMBOLS = b"{}[];<>_|&#$\\"
CODE_SYMBOL_DENSITY = 0.03
CODE_SYMBOL_MIN = 4
# The # of an issue or bug number ("Closes: #947043", "PR #12") is prose: not counted as a symbol.
ISSUE_REFERENCE = re.compile(rb"#\d")
# Substrings (of the lower-cased ASCII) that are almost never prose. Every branch starts with a symbol that is
# rare in prose (what comes before it is checked by a look-behind), so the regex engine only stops at those.
# ('", line 3' is a Python traceback's frame line; '("' must follow a name, as in f("x"), not a space. A comment's
# /* and */ stand apart, not in a path pattern as in "debian/*"; ++ ends a statement or starts an operand, not a
# name as in g++; Prolog's :- is followed by a space, a smiley's :-( is not.)
CODE_SYMBOL_MARKERS = re.compile(
    rb"```|#include|#!/|=>|==|!=|\(\);|\) ?\{|\};|</|/>|::|:-(?=\s)|\+\+(?=[a-z(])|\+\+(?<=[\w)\]]\+\+)(?=[;)\]])"
    rb"|/\*(?<![\w.*-]/\*)|\*/(?<=\s\*/)(?![\w*])|// (?<= // )|\", line \d"
    rb'|\((?<=print\()|\((?<=\.log\()|\("(?<=[\w)]\(")'
)
# Language names, keywords and programming vocabulary, checked against the prompt's set of words.
CODE_WORDS = frozenset(
    b"python javascript typescript java rust golang kotlin ruby php perl haskell c++ c# sql bash regex html css json "
    b"yaml api git pytest compile compiler traceback refactor debug algorithm script recursion snippet "
    b"deadlock def elif lambda func fn var printf println byval".split()
)
# Phrases, searched for only when their last word is among the prompt's words.
CODE_PHRASES = (
    b"shell script",
    b"unit test",
    b"stack trace",
    b"binary search",
    b"linked list",
    b"source code",
    b"list comprehension",
    b"for loop",
    b"while loop",
)
CODE_PHRASE_WORDS = frozenset(phrase.split()[-1] for phrase in CODE_PHRASES)
# "function" alone is prose as often as code ("a biological function"); it takes the words of a request or a
# definition around it.
CODE_FUNCTION = re.compile(
    rb"(?:this|following|recursive|helper) function|function\("
    rb"|(?:the|a) function (?:that|which|to|called|named|returns?|takes?|should|must|with|does|above|below)\b"
)
# Identifiers: how many mixedCase names (getElementById) or member accesses (os.path) make code; counted on the
# ASCII text with lower-case letters mapped to a and upper-case to A. Prose has a few (McDonald, e.g.).
CODE_IDENTIFIERS = 4
CODE_HAN = re.compile("代码|函数|编程|脚本|算法|源程序")  # code, function, programming, script, algorithm
# In prose written in a CJK script (more CJK characters than Latin words), a programming name is a name ("SQL
# 명령어 설명서", the SQL command's manual; "JSON 格式的文件"), not a request for code: the word rule takes a word
# of programming of those scripts with it (code, program, function, script, algorithm, implement, compile...).
CODE_CJK = re.compile(
    "代码|代碼|程式|程序|函数|函式|编程|編程|脚本|腳本|算法|编写|編寫|实现|實現|编译|編譯"
    "|코드|함수|프로그램|스크립트|알고리즘|구현|쿼리|컴파일|디버그"
    "|コード|関数|プログラム|スクリプト|アルゴリズム|実装|コンパイル"
)
# A shell command on a line of its own, as manuals show them: after a $ or # prompt, or a lower-case command
# name followed by an option (`tar -xvf a.tar`, `ls --all`); searched for only when the prompt has " -", "$ "
# or "# ".
CODE_COMMAND_LINE = re.compile(rb"\n[ \t]*(?:[$#] [a-z]|[a-z][\w.+-]* +-{1,2}[a-zA-Z])")
# In a prompt written in a CJK script, a line of ASCII words only that starts with a lower-case name is a
# command or code (`tcpdump host sundown`, `route add -net 127.0.0.0`): prose lines hold CJK characters.
# (Both are searched in "\n" + the prompt: a pattern that starts with a literal lets the engine skip to it.)
CJK_ASCII_LINE = re.compile(r"(?m)\n[ \t]*(?:[$#] )?[a-z][\w.+-]*(?: +[\x21-\x7e]+)+[ \t]*$")
# Line shapes of code (a line that ends in one of these, or starts with one of those).
CODE_LINE_ENDS = ("{", "}", ")", "(", "=", "[", "]", " then", " do", "end")
CODE_LINE_STARTS = ("#", "//", "!", "}", "<", "@", "end", "if ", "let ", "open ", "import ", "return")
CODE_LINE_SHARE = 0.5
PROSE_BULLETS = ("- ", "* ", "• ")  # a list item that ends in ")" is prose: "- Update Czech translation (Adam)"
# The words any rule looks at: a prompt's words are intersected with it once, and the rules test that small set.
VOCABULARY = CODE_WORDS | CODE_PHRASE_WORDS | {b"function"} | MATH_VOCABULARY
# bytes.translate keeps letters, digits, + and #, and turns everything else into a space: a fast word split.
_WORD_BYTES = bytes(c if chr(c).isalnum() or chr(c) in "+#" else 32 for c in range(128)) + b" " * 128
_LETTER_BYTES = bytes(c if chr(c).isalpha() else 32 for c in range(128)) + b" " * 128
_NAME_PARTS = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz0123456789-/"]  # what joins a word into a name
_LETTERS = bytes(c for c in range(128) if chr(c).isalpha())
_CASE_BYTES = (
    bytes(97 if chr(c).islower() else 65 if chr(c).isupper() else 46 if c == 46 else 32 for c in range(128))
    + b" " * 128
)


class DomainClassifier(Protocol):
    """What the router needs from a classifier: the labels of one prompt, and of a batch (the router classifies the
    batches it is sent in one call, so that a classifier can work on many prompts at once)."""

    def labels(self, text: str, has_image: bool = False) -> list[str]: ...

    def labels_of(self, texts: list[str], has_images: list[bool] | None = None) -> list[list[str]]: ...


def _chinese_share(text: str, ascii_text: bytes, utf8: bytes) -> float:
    """Share of Han characters among the words of the prompt (see CHINESE_SHARE); 0 for Japanese (kana) text."""
    kana = 0
    if b"\xe3\x81" in utf8 or b"\xe3\x82" in utf8 or b"\xe3\x83" in utf8:  # the kana block at all
        found = KANA_LETTER.search(utf8)
        if found and KANA_LETTER.search(utf8, found.end()):  # two: no need to count them all
            return 0.0
        kana = 1 if found else 0
    han = count(utf8, HAN_LEAD_BYTES)
    others = len(ascii_text.translate(_LETTER_BYTES).split()) + count(utf8, HANGUL_LEAD_BYTES) + kana
    if han < CHINESE_MIN_HAN or han < CHINESE_SHARE * (han + others):  # the rare blocks may still tip it
        han += len(RARE_HAN.findall(text)) if RARE_HAN.search(text) else 0
    return han / (han + others) if han >= CHINESE_MIN_HAN else 0.0


def _cjk_prose(ascii_text: bytes, utf8_length: int) -> bool:
    """Whether CJK characters (two bytes more than their "?" each, in most blocks) outnumber the Latin words."""
    return utf8_length - len(ascii_text) > 2 * len(ascii_text.translate(_LETTER_BYTES).split())


def _standalone(data: bytes, word: bytes) -> bool:
    """Whether `word` stands on its own somewhere in `data`, not as a part of a package, file or path name
    (python3-apt, /usr/share/java/, git-man, script.sh): those are names, not a language."""
    start = data.find(word)
    while start >= 0:
        end = start + len(word)
        before, after = data[start - 1 : start] if start else b" ", data[end : end + 2]
        if (
            before not in _NAME_PARTS
            and (not after or after[:1] not in _NAME_PARTS)
            and not (after[:1] == b"." and after[1:2].isalnum())
        ):
            return True
        start = data.find(word, end)
    return False


def _code_lines(text: str) -> bool:
    """Whether CODE_LINE_SHARE of the (at least 3) non-empty lines are shaped like code: ending in a bracket or
    separator, or opening with a comment or keyword. Stops as soon as the share can no longer be reached."""
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    if len(lines) < 3:
        return False
    allowed = len(lines) * (1 - CODE_LINE_SHARE)  # prose lines there may be
    prose = 0
    for line in lines:
        if not (
            line.startswith(CODE_LINE_STARTS) or (line.endswith(CODE_LINE_ENDS) and not line.startswith(PROSE_BULLETS))
        ):
            prose += 1
            if prose > allowed:
                return False
    return True


def _code_request(text: str, ascii_text: bytes, data: bytes, words: set[bytes], utf8_length: int) -> str | None:
    """The name of the first rule that finds code asked for in words (a language, a programming word or phrase,
    "function" in a request, a Chinese word for code), or None."""
    if (
        not words.isdisjoint(CODE_WORDS)
        and (text.isascii() or not _cjk_prose(ascii_text, utf8_length) or CODE_CJK.search(text))
        and any(_standalone(data, word) for word in words & CODE_WORDS)
    ):
        return "word"
    if not words.isdisjoint(CODE_PHRASE_WORDS) and any(phrase in data for phrase in CODE_PHRASES):
        return "phrase"
    if b"function" in words and CODE_FUNCTION.search(data):
        return "function"
    if not text.isascii() and CODE_HAN.search(text):
        return "han"
    return None


def has_code_marker(data: bytes) -> bool:
    """Whether the lower-cased ASCII of a prompt holds a substring that is almost never prose (CODE_SYMBOL_MARKERS:
    a code fence, #include, =>, ==, !=, ::, </, ...)."""
    return CODE_SYMBOL_MARKERS.search(data) is not None


def _code_rule(text: str, ascii_text: bytes, data: bytes, words: set[bytes], utf8_length: int) -> str | None:
    """The name of the first code rule that fires (to tell why a prompt was labelled code), or None."""
    asked = _code_request(text, ascii_text, data, words, utf8_length)
    if asked:
        return asked
    symbols = count(data, CODE_SYMBOLS)
    needed = max(CODE_SYMBOL_DENSITY * utf8_length, CODE_SYMBOL_MIN)
    if symbols >= needed and (b"#" not in data or symbols - len(ISSUE_REFERENCE.findall(data)) >= needed):
        return "symbols"
    cased = ascii_text.translate(_CASE_BYTES)
    if cased.count(b"aA") >= CODE_IDENTIFIERS or cased.count(b"a.a") + cased.count(b"A.a") >= CODE_IDENTIFIERS:
        return "identifiers"
    if has_code_marker(data):
        return "marker"
    if (  # a one-byte search (memchr) first: b" -" alone is slow on text with many spaces
        (b"-" in ascii_text and b" -" in ascii_text)
        or (b"$" in ascii_text and b"$ " in ascii_text)
        or (b"#" in ascii_text and b"# " in ascii_text)
    ) and CODE_COMMAND_LINE.search(b"\n" + ascii_text):
        return "command"
    if (
        not text.isascii()
        and "\n" in text
        and utf8_length - len(ascii_text) > count(ascii_text, _LETTERS)
        and CJK_ASCII_LINE.search("\n" + text)
    ):  # more CJK (2 extra bytes each) than ASCII letters
        return "command"
    if "\n" in text and _code_lines(text):
        return "lines"
    return None


ENTRY_POINT_GROUP = CLASSIFIER_ENTRY_POINTS  # declared in config, which checks a config's name against it


def _installed() -> dict:
    """The entry points of the `avocado_ray.classifiers` group, by name."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def installed_classifiers() -> list[str]:
    """The names a config can select (avocado-ray registers `linear`, `rules`, `cld2` and `lingua`)."""
    return sorted(_installed())


def load_classifier(name: str) -> DomainClassifier:
    """The classifier an installed package registers under `name` in the `avocado_ray.classifiers` entry points.

    Only installed entry points can be named: a config string is never imported as a module path.
    """
    found = _installed()
    if name not in found:
        raise ValueError(f"no classifier {name!r} among the installed {ENTRY_POINT_GROUP} entry points {sorted(found)}")
    return found[name].load()()


class RuleClassifier:
    """Rules over scripts, symbols and vocabulary: tens of thousands of prompts per second on one core."""

    def is_chinese(self, text: str, ascii_text: bytes, utf8: bytes) -> bool:
        """Whether a prompt with non-ASCII characters is mainly Chinese (subclasses ask a language identifier)."""
        return _chinese_share(text, ascii_text, utf8) >= CHINESE_SHARE

    def labels(self, text: str, has_image: bool = False) -> list[str]:
        surface = Surface(text)
        found = ["multimodal"] if has_image else []
        if _code_rule(text, surface.unlinked, surface.data, surface.words, surface.length):
            found.append("code")
        if self.chinese(text, surface):
            found.append("chinese")
        if math_rule(text, surface.data, surface.words):
            found.append("math")
        return found or ["general"]

    def labels_of(self, texts: list[str], has_images: list[bool] | None = None) -> list[list[str]]:
        """The labels of each prompt of a batch (the rules look at one prompt at a time)."""
        return [self.labels(text, has_image) for text, has_image in zip(texts, has_images or [False] * len(texts))]

    def chinese(self, text: str, surface: Surface) -> bool:
        """Whether the prompt is mainly Chinese (ASCII text never is)."""
        return surface.utf8 is not None and self.is_chinese(text, surface.ascii_text, surface.utf8)

    def asks_for_code(self, text: str, surface: Surface) -> bool:
        """Whether the prompt asks for code in words (for a classifier that recognises code by its shape)."""
        return _code_request(text, surface.unlinked, surface.data, surface.words, surface.length) is not None


class Surface:
    """What the rules read of a prompt. The rules but the script ones look at ASCII only; other characters become
    "?", a separator, so that the words on either side of a Han character stay apart."""

    __slots__ = ("ascii_text", "unlinked", "data", "words", "utf8", "length")

    def __init__(self, text: str) -> None:
        self.ascii_text = text.encode("ascii", "replace")
        self.unlinked = _unlinked(self.ascii_text)
        self.data = self.unlinked.lower()
        self.words = VOCABULARY.intersection(self.data.translate(_WORD_BYTES).split())
        self.utf8 = None if text.isascii() else text.encode("utf-8", "surrogatepass")  # a lone surrogate too
        self.length = (len(text) if self.utf8 is None else len(self.utf8)) - (len(self.ascii_text) - len(self.unlinked))
