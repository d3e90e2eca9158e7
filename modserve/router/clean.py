"""Strip what carries no language before detection: code, LaTeX, URLs, numbers, math symbols.

Math word problems are full of `$3x+5=20$`, units and digits; left in, they pull
short texts towards whatever language the detector associates with them.
"""

from __future__ import annotations

import re

# Order matters: code and LaTeX first, so numbers inside them are counted once.
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("code", re.compile(r"```.*?(?:```|$)|`[^`\n]+`", re.S)),
    # Inline $...$ as pandoc reads it: no space inside either dollar, no digit after the
    # closing one — so prices ("$2 ... $3") are not taken for math.
    ("latex", re.compile(r"\$\$.+?\$\$|\$(?=\S)[^$\n]+?(?<=\S)\$(?!\d)|\\\(.+?\\\)|\\\[.+?\\\]", re.S)),
    ("url", re.compile(r"\bhttps?://\S+|\bwww\.\S+", re.I)),
    ("number", re.compile(r"[-+]?\d+(?:[.,:/]\d+)*%?")),
    ("symbol", re.compile(r"[=+\-*/×÷^<>±≤≥≈%$€£¥₹()\[\]{}|\\_#&@~]+")),
]
SPACE = re.compile(r"\s+")


def strip_non_language(text: str) -> tuple[str, dict[str, int]]:
    """(text left for the detector, how many spans of each kind were removed)."""
    removed: dict[str, int] = {}
    for kind, pattern in PATTERNS:
        text, count = pattern.subn(" ", text)
        removed[kind] = count
    return SPACE.sub(" ", text).strip(), removed
