"""Language detectors behind one small interface, with labels folded to pack codes.

py3langid (default) is fast and strong on short texts; langdetect is seeded so
it answers the same way in every process.
"""

from __future__ import annotations

import threading
from typing import Protocol

from modserve.errors import ModserveError

# Detector labels that name the same pack language.
FOLD = {"zh-cn": "zh", "zh-tw": "zh", "wuu": "zh", "yue": "zh", "nn": "no", "zxx": ""}


def fold(label: str) -> str:
    return FOLD.get(label, label)


class Detector(Protocol):
    name: str

    @property
    def codes(self) -> frozenset[str]:
        """Every (folded) language code this detector can answer."""

    def detect(self, text: str) -> tuple[str, float]:
        """(folded code, probability); ("", 0.0) when it cannot tell."""


def restricted_labels(codes: frozenset[str], labels: list[str], candidates: list[str], name: str) -> list[str]:
    unknown = sorted(set(candidates) - codes)
    if unknown:
        raise ModserveError(f"router.candidates: {', '.join(unknown)} unknown to {name}")
    return [label for label in labels if fold(label) in candidates]


class Py3Langid:
    name = "py3langid"

    def __init__(self, candidates: list[str] | None = None):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        # A private instance: restricting candidates must not touch another router's.
        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        labels = list(self.identifier.labels)
        self.codes = frozenset(filter(None, map(fold, labels)))
        if candidates is not None:
            self.identifier.set_languages(restricted_labels(self.codes, labels, candidates, self.name))

    def detect(self, text: str) -> tuple[str, float]:
        label, probability = self.identifier.classify(text)
        code = fold(label)
        return (code, float(probability)) if code else ("", 0.0)


class Langdetect:
    name = "langdetect"
    _profiles_lock = threading.Lock()

    def __init__(self, candidates: list[str] | None = None):
        from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

        with self._profiles_lock:
            self.factory = DetectorFactory()
            self.factory.load_profile(PROFILES_DIRECTORY)
        self.factory.seed = 0  # langdetect samples n-grams at random: seeded, it is deterministic
        labels = list(self.factory.get_lang_list())
        self.codes = frozenset(map(fold, labels))
        self.allowed = None if candidates is None else set(restricted_labels(self.codes, labels, candidates, self.name))

    def detect(self, text: str) -> tuple[str, float]:
        from langdetect.lang_detect_exception import LangDetectException

        detector = self.factory.create()
        detector.append(text)
        try:
            ranked = detector.get_probabilities()
        except LangDetectException:
            return "", 0.0
        scores: dict[str, float] = {}
        for guess in ranked:
            if self.allowed is None or guess.lang in self.allowed:
                code = fold(guess.lang)
                scores[code] = scores.get(code, 0.0) + guess.prob
        if not scores:
            return "", 0.0
        total = sum(scores.values())
        code = max(scores, key=scores.get)
        return code, scores[code] / total


DETECTORS = {"py3langid": Py3Langid, "langdetect": Langdetect}


def make_detector(name: str, candidates: list[str] | None) -> Detector:
    try:
        return DETECTORS[name](candidates)
    except KeyError:
        raise ModserveError(f"router.detector: {name!r} is not one of {', '.join(DETECTORS)}") from None
