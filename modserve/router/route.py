"""Pick the pack for a request: explicit choice first, then the detected language.

A language without a pack, or a detection under `min_confidence`, goes to the
resident — never to the nearest pack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from modserve.errors import ModserveError
from modserve.languages import RESIDENT
from modserve.router.clean import strip_non_language
from modserve.router.detect import make_detector


class UnknownLanguageError(ModserveError):
    """An explicit language (model id or `language` field) that no pack serves."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RoutingDecision:
    language: str  # a pack code, or "resident"
    detected: str | None  # the detector's folded label; None when there was nothing to read
    confidence: float  # the detector's, also when an explicit choice overrode it
    reason: str  # model | language | detected | low_confidence | no_pack | empty
    text: str = ""  # what the detector read, after stripping
    removed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def header_detected(self) -> str:
        """X-Modserve-Detected: `<lang>;q=<confidence>` (`none;q=0.00` when nothing was read)."""
        return f"{self.detected or 'none'};q={self.confidence:.2f}"


class Router:
    def __init__(
        self,
        packs: list[str],
        detector: str = "py3langid",
        candidates: str | list[str] = "all",
        min_confidence: float = 0.5,
        fallback: str = RESIDENT,
    ):
        if fallback != RESIDENT:
            raise ModserveError(f"router.fallback: only 'resident' is supported, got {fallback!r}")
        self.languages = sorted(packs)
        self.min_confidence = min_confidence
        self.detector = make_detector(detector, None if candidates == "all" else list(candidates))

    def route_messages(
        self, messages: list[dict], explicit_model: str | None = None, explicit_language: str | None = None
    ) -> RoutingDecision:
        """Routes on the last user message: the text the model must answer."""
        user = [m for m in messages if m.get("role") == "user"]
        return self.route_prompt(message_text(user[-1]) if user else "", explicit_model, explicit_language)

    def route_prompt(
        self, text: str, explicit_model: str | None = None, explicit_language: str | None = None
    ) -> RoutingDecision:
        """Explicit choice wins; the text is still detected, so the response can say what
        the client's choice overrode (X-Modserve-Detected)."""
        if explicit_model is not None:
            return self.explicit(explicit_model, "model", text)
        if explicit_language is not None:
            return self.explicit(explicit_language, "language", text)
        return self.detect(text)

    def explicit(self, language: str, param: str, text: str) -> RoutingDecision:
        if language != RESIDENT and language not in self.languages:
            choices = ", ".join([*self.languages, RESIDENT])
            what = f"modserve:{language}" if param == "model" else repr(language)
            raise UnknownLanguageError(f"{param}: no pack for {what}; choose one of {choices}", param)
        return replace(self.detect(text), language=language, reason=param)

    def detect(self, text: str) -> RoutingDecision:
        start = time.perf_counter()
        cleaned, removed = strip_non_language(text)
        has_letters = any(c.isalpha() for c in cleaned)  # "?" or "," alone say nothing
        code, confidence = self.detector.detect(cleaned) if has_letters else ("", 0.0)
        seconds = time.perf_counter() - start
        if not code:
            return RoutingDecision(RESIDENT, None, 0.0, "empty", cleaned, removed, seconds)
        if confidence < self.min_confidence:
            reason, language = "low_confidence", RESIDENT
        elif code not in self.languages:
            reason, language = "no_pack", RESIDENT
        else:
            reason, language = "detected", code
        return RoutingDecision(language, code, confidence, reason, cleaned, removed, seconds)


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""
