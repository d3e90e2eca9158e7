"""MGSM questions (vendored in data/mgsm/) and the text variants the router is held to."""

from __future__ import annotations

import re
from pathlib import Path

LANGUAGES = ["bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"]
SENTENCE_END = re.compile(r"(?<=[.!?。！？।])\s*")
LATEX = " $3x+5=20$"


def questions(mgsm_dir: Path) -> dict[str, list[str]]:
    return {
        lang: [line.split("\t")[0] for line in (mgsm_dir / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines()]
        for lang in LANGUAGES
    }


def first_sentence(text: str) -> str:
    return next(part for part in SENTENCE_END.split(text) if part.strip())


VARIANTS = {
    "question": lambda q: q,
    "first_sentence": first_sentence,
    "first_sentence_latex": lambda q: first_sentence(q) + LATEX,
}
