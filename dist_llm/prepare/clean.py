"""Text cleaning: small pure functions, applied in the order ``clean.steps`` lists them.

Why small named steps: each one is testable alone, the config says exactly what ran (it is
recorded in the manifest), and adding a step is one function plus one registry entry.
Whitespace normalisation keeps indentation and single blank lines, so code survives it.
"""
from __future__ import annotations

import html
import re
import unicodedata
from typing import Callable, Dict, List, Sequence

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls except \t \n \r
_UNICODE_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BLOCK_TAG = re.compile(r"</?(p|div|br|li|ul|ol|h[1-6]|tr|table|section|article|header|footer|pre)\b[^>]*>",
                        re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")


def nfc(text: str) -> str:
    """Canonical composition: 'e' + U+0301 and U+00E9 become the same string (and the same hash)."""
    return unicodedata.normalize("NFC", text)


def strip_control(text: str) -> str:
    """Drop control characters (NUL, BEL, escape sequences' ESC, C1) but keep tab and newlines."""
    return _CONTROL.sub("", text)


def normalize_whitespace(text: str) -> str:
    """CRLF/CR to LF, exotic spaces to ' ', zero-width characters removed, trailing spaces cut,
    runs of blank lines cut to one blank line, the document trimmed. Indentation is kept."""
    # Each substitution runs only where it can match (substring tests are far cheaper than a
    # regex scan); the result is the same as running them all.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = _ZERO_WIDTH.sub("", _UNICODE_SPACES.sub(" ", text))
    # Trailing blanks can only precede a newline or end the text, and the final strip() removes
    # the latter anyway.
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def strip_html(text: str) -> str:
    """Remove scripts, styles, comments and tags (block tags become newlines), unescape entities.

    A regex stripper, not a browser: good for crawled snippets, not for arbitrary web pages.
    """
    text = _COMMENT.sub("", _SCRIPT_STYLE.sub("", text))
    text = _TAG.sub("", _BLOCK_TAG.sub("\n", text))
    return html.unescape(text)


STEPS: Dict[str, Callable[[str], str]] = {
    "nfc": nfc,
    "strip_control": strip_control,
    "normalize_whitespace": normalize_whitespace,
    "strip_html": strip_html,
}


def make_cleaner(steps: Sequence[str]) -> Callable[[str], str]:
    """Compose the named steps, in order, into one function."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown clean.steps {unknown}; known: {sorted(STEPS)}")
    fns: List[Callable[[str], str]] = [STEPS[s] for s in steps]

    def clean(text: str) -> str:
        for f in fns:
            text = f(text)
        return text

    return clean
