"""The math rule of the RuleClassifier (avocado_ray/routing/classifier.py): words that make a prompt
mathematical on their own, words that do so next to numbers, and arithmetic in the prompt's shape. It looks at the
lower-cased ASCII of the prompt without its links (`data`) and at the prompt's set of words, as the code rule does.
"""

from __future__ import annotations

import re

from avocado_ray.routing.textbytes import DIGITS, count, unlinked

# Words that make a prompt mathematical on their own, and words that do so only next to numbers.
MATH_WORDS = frozenset(b"derivative integral equation theorem polynomial prob composite".split())
MATH_PHRASES = (
    b"without replacement",
    b"ascending order",
    b"descending order",
    b"decreasing order",
    b"increasing order",
    b"(base ",
    b" base ",
)
MATH_PHRASE_WORDS = frozenset(b"replacement order base".split())
MATH_HAN = re.compile("方程|证明|求解|概率")
MATH_WORDS_WITH_NUMBERS = frozenset(
    b"solve simplify calculate compute evaluate expand factor prime divisor multiple remainder divide divided sum "
    b"product round convert sequence percent average biggest smallest greater smaller sort determine total multiply "
    b"subtract add equal proof prove probability closest nearest bigger denominator numerator".split()
)
MATH_PHRASES_WITH_NUMBERS = (
    b"what is",
    b"how many",
    b"how much",
    b"put together",
    b"work out",
    b"what comes next",
    b"as big as",
)
MATH_PHRASE_WITH_NUMBERS_WORDS = frozenset(b"what how put work big".split())
MATH_HAN_WITH_NUMBERS = re.compile("计算|等于|多少")
# Fractions in words ("three fifths of a centimetre") are numbers too.
MATH_FRACTION_WORDS = frozenset(
    b"half halves third thirds quarter quarters fifth fifths sixth sixths seventh sevenths eighth eighths ninth "
    b"ninths tenth tenths hundredth hundredths thousandth thousandths".split()
)
MATH_WORDED_FRACTION = re.compile(
    rb"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen"
    rb"|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety) (?:half|halves|third"
    rb"|quarter|fifth|sixth|seventh|eighth|ninth|tenth|hundredth|thousandth)"
)
MATH_DIGIT_SHARE = 0.02  # numbers must be a visible part of the prompt, not one date in a story
# Digits that are no quantity: in a name (libx11, python3, NSS_3_52), a reference (#982440, CVE-2021-36084), a
# version (1.0.5) or a date (2021-03-07), as changelogs have them. (Counted without them only once the rest of
# the rule holds; every branch starts with a digit.)
NOT_A_NUMBER = re.compile(rb"\d(?:(?<=[a-z_#]\d)[\w.-]*|(?<=[a-z]-\d)[\w.-]*|\d*(?:\.\d+){2,}\w*|\d{3}-\d\d-\d\d)")
# Operator words between two numbers ("3 times 4"; not "3 times a day").
MATH_OPERATOR_WORDS = frozenset(b"times plus minus".split())
MATH_WORDED_ARITHMETIC = re.compile(rb"\d (?:times|plus|minus) -?\d")
# Arithmetic between numbers, brackets and one-letter variables, over the prompt's ASCII shape (SHAPE_BYTES: a
# list's "* " or "- " after a number at the end of the line above is no product or difference, so the line break
# stays): few kinds of characters, and every branch starts with a literal, so the regex engine skips to them.
_OPERAND = rb"-?(?:[0(]|a(?![a0]))"  # a number, a bracket, or a one-letter variable (not a word, not -r1.2)
MATH_ARITHMETIC = re.compile(
    rb"0 *[+*^=<>] *"
    + _OPERAND  # 3 + x, 2^4, 1 = 1, 2 < 3
    + rb"|0(?: +-|- ) *"
    + _OPERAND  # 3 - 4; not the ranges 1939-1945 or 6-12
    + rb"|0(?: +/|/ ) *-?[0(]|0 */ *-?(?:\(|a(?!a))"  # 6 / 3, 6/x; not a fraction on its own (1/2 oz)
    + rb"|\*\* *0|\^ *0"  # powers
)
# A time of day and its zone (Fri Apr 17 20:59:17 2015 +0900): no sum, on the shape.
CLOCK_ZONE = re.compile(rb"0:00(?::00)?(?: 0+)? +[+-]0000")

# The math words the classifier intersects a prompt's words with (its VOCABULARY holds them).
MATH_VOCABULARY = (
    MATH_WORDS
    | MATH_PHRASE_WORDS
    | MATH_WORDS_WITH_NUMBERS
    | MATH_PHRASE_WITH_NUMBERS_WORDS
    | MATH_OPERATOR_WORDS
    | MATH_FRACTION_WORDS
)


def _shape_byte(byte: int) -> int:
    """The ASCII shape: digits -> 0, letters, _ and # -> a, a line break kept, other white space -> a space."""
    character = chr(byte)
    if character.isdigit():
        return ord("0")
    if character.isalpha() or character in "_#":
        return ord("a")
    return ord(" ") if character.isspace() and character != "\n" else byte


SHAPE_BYTES = bytes(map(_shape_byte, range(128))) + b"." * 128


def _asks_with_numbers(text: str, data: bytes, words: set[bytes], han: bool) -> bool:
    """Whether the prompt has a word or phrase that makes numbers next to it mathematical ("sum", "how many")."""
    return bool(
        not words.isdisjoint(MATH_WORDS_WITH_NUMBERS)
        or (
            not words.isdisjoint(MATH_PHRASE_WITH_NUMBERS_WORDS)
            and any(phrase in data for phrase in MATH_PHRASES_WITH_NUMBERS)
        )
        or (han and MATH_HAN_WITH_NUMBERS.search(text))
    )


def _quantity_digits(data: bytes, shape: bytes, digits: int) -> int:
    """How many of the prompt's `digits` are in numbers, not in names, references, versions or dates: the regex
    runs only when the shape has a digit after a letter, _ or # (a changelog has those; most prompts have none)."""
    return count(NOT_A_NUMBER.sub(b" ", data), DIGITS) if b"a0" in shape else digits


def math_rule(text: str, data: bytes, words: set[bytes]) -> str | None:
    """The name of the first math rule that fires (to tell why a prompt was labelled math), or None."""
    han = not text.isascii()
    if not words.isdisjoint(MATH_WORDS) and (
        b"derivative work" not in data  # a legal term ("derivative works of the Software"), not calculus
        or data.count(b"derivative") > data.count(b"derivative work")
        or len(words & MATH_WORDS) > 1
    ):
        return "word"
    if not words.isdisjoint(MATH_PHRASE_WORDS) and any(phrase in data for phrase in MATH_PHRASES):
        return "phrase"
    if han and MATH_HAN.search(text):
        return "han"
    if (
        not words.isdisjoint(MATH_FRACTION_WORDS)
        and MATH_WORDED_FRACTION.search(data)
        and _asks_with_numbers(text, data, words, han)
    ):
        return "worded fraction"
    digits = count(data, DIGITS)
    if not digits:
        return None
    if not words.isdisjoint(MATH_OPERATOR_WORDS) and MATH_WORDED_ARITHMETIC.search(data):
        return "arithmetic"
    if han:  # the × and ÷ signs as their ASCII operators, and again without links
        shape = text.replace("×", "*").replace("÷", "/").encode("ascii", "replace")
        shape = unlinked(shape)
    else:
        shape = data
    shape = shape.translate(SHAPE_BYTES)
    if (
        digits >= MATH_DIGIT_SHARE * len(text)
        and _asks_with_numbers(text, data, words, han)
        and _quantity_digits(data, shape, digits) >= MATH_DIGIT_SHARE * len(text)
    ):
        return "numbers+word"
    found = MATH_ARITHMETIC.search(shape)
    if found and b":" in shape and CLOCK_ZONE.search(shape):  # again without the times of day
        found = MATH_ARITHMETIC.search(CLOCK_ZONE.sub(b" ", shape))
    return "arithmetic" if found else None
