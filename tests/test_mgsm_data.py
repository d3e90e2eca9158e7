"""MGSM is vendored in data/mgsm/ (CC BY 4.0), so a fresh clone runs every MGSM test."""

from __future__ import annotations

import pytest

from tests.conftest import MGSM_DIR, REPO
from tests.mgsm import LANGUAGES

SHARED_MGSM = REPO.parent / "shared" / "data" / "mgsm"


def test_vendored_mgsm_holds_250_aligned_problems_per_language_and_its_attribution():
    rows = {lang: (MGSM_DIR / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines() for lang in LANGUAGES}
    answers = {lang: [row.split("\t")[1] for row in lines] for lang, lines in rows.items()}
    assert all(len(lines) == 250 and all(row.count("\t") == 1 for row in lines) for lines in rows.values())
    assert all(answers[lang] == answers["en"] for lang in LANGUAGES)  # row i is one problem everywhere
    attribution = (MGSM_DIR / "README.md").read_text(encoding="utf-8")
    assert "CC BY 4.0" in attribution and "google-research/url-nlp" in attribution


def test_vendored_mgsm_is_byte_identical_to_the_copy_beside_the_checkout():
    if not SHARED_MGSM.is_dir():
        pytest.skip(f"no copy beside the checkout at {SHARED_MGSM}")
    vendored = sorted(p.name for p in MGSM_DIR.iterdir())
    assert vendored == sorted(p.name for p in SHARED_MGSM.iterdir())
    assert all((MGSM_DIR / name).read_bytes() == (SHARED_MGSM / name).read_bytes() for name in vendored)
