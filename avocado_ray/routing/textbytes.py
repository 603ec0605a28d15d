"""Byte-level helpers the classifier's rules share: counting characters in one C-level pass, and the prompt's
ASCII without its links and e-mail addresses."""

from __future__ import annotations

import re

DIGITS = b"0123456789"
# Links and e-mail addresses: their words ("index.html", "bug-python"), dots (a.b looks like a member access)
# and brackets (<ada@example.org>) are not the prompt's; a changelog's list of authors is not code. Removed from
# the ASCII text that the code and math rules see (the script rules count the prompt as written). A link starts
# at a word's start (the look-behind fails at once inside a word, and the possessive name is not backtracked).
LINK = re.compile(rb"(?<![\w.+-])[<A-Za-z][\w.+-]*+(?:://[^\s>]*>?|@[\w-]+(?:\.[\w-]+)+>?)")
EMAIL_DOMAIN = re.compile(rb"@[\w-]+\.[a-zA-Z]")  # what LINK is run for (not an @decorator or @variable)


def count(data: bytes, characters: bytes) -> int:
    """How many bytes of `data` are among `characters` (bytes.translate runs in C)."""
    return len(data) - len(data.translate(None, characters))


def unlinked(ascii_text: bytes) -> bytes:
    """`ascii_text` with its links and e-mail addresses replaced by a space (the text itself when it has none)."""
    if b"://" in ascii_text or (b"@" in ascii_text and EMAIL_DOMAIN.search(ascii_text)):
        return LINK.sub(b" ", ascii_text)
    return ascii_text
