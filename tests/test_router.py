"""The router on real multilingual math questions (MGSM, 11 languages x 250)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modserve.errors import ModserveError
from modserve.router import Router, UnknownLanguageError
from modserve.router.clean import strip_non_language
from tests.conftest import MODSERVE
from tests.mgsm import LANGUAGES, VARIANTS, questions

PACKS = ["sw", "te", "bn", "ja"]


@pytest.fixture(scope="module")
def mgsm(mgsm_dir) -> dict[str, list[str]]:
    return questions(mgsm_dir)


def detection_accuracy(router: Router, mgsm, variant) -> dict[str, float]:
    return {lang: sum(router.detect(variant(q)).detected == lang for q in qs) / len(qs) for lang, qs in mgsm.items()}


def overall(per_language: dict[str, float]) -> float:
    return sum(per_language.values()) / len(per_language)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packs_get_their_questions_and_other_languages_go_to_the_resident(mgsm, variant):
    router = Router(PACKS)
    for lang, qs in mgsm.items():
        want = lang if lang in PACKS else "resident"
        routed = [router.detect(VARIANTS[variant](q)).language for q in qs]
        assert routed.count(want) / len(qs) >= 0.95, (lang, variant)
    total = sum(router.detect(VARIANTS[variant](q)).language == (lang if lang in PACKS else "resident")
                for lang, qs in mgsm.items() for q in qs)
    assert total / 2750 >= 0.99


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_py3langid_over_all_its_labels_detects_985_percent(mgsm, variant):
    assert overall(detection_accuracy(Router(PACKS), mgsm, VARIANTS[variant])) >= 0.985


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_py3langid_over_the_mgsm_languages_detects_995_percent_and_98_each(mgsm, variant):
    per_language = detection_accuracy(Router(PACKS, candidates=LANGUAGES), mgsm, VARIANTS[variant])
    assert overall(per_language) >= 0.995
    assert min(per_language.values()) >= 0.98, per_language


def test_restricting_candidates_to_the_packs_would_misroute_russian_and_thai(mgsm):
    """Why candidates default to every label: restricted, ru/th land on a pack."""
    narrow = Router(PACKS, candidates=[*PACKS, "en"], min_confidence=0.0)
    wide = Router(PACKS)
    for lang in ("ru", "th"):
        assert sum(narrow.detect(q).language != "resident" for q in mgsm[lang]) > 100
        assert sum(wide.detect(q).language != "resident" for q in mgsm[lang]) == 0


def test_langdetect_runs_over_mgsm_and_is_deterministic(mgsm):
    router = Router(PACKS, detector="langdetect")
    sample = [q for qs in mgsm.values() for q in qs[:20]]
    first = [router.detect(q).detected for q in sample]
    assert first == [router.detect(q).detected for q in sample]
    assert sum(d == lang for d, lang in zip(first, [lang for lang in mgsm for _ in range(20)], strict=True)) / len(first) >= 0.9


@pytest.mark.parametrize("detector", ["py3langid", "langdetect"])
def test_detection_is_the_same_in_another_process(mgsm, detector):
    texts = [mgsm[lang][i] for lang in LANGUAGES for i in (0, 7)] + ["Habari", "2 + 2 = ?"]
    here = [[d.detected, round(d.confidence, 6)] for d in map(Router(PACKS, detector=detector).detect, texts)]
    script = (
        f"import json, sys; from modserve.router import Router; r = Router({PACKS!r}, detector={detector!r}); "
        "print(json.dumps([[d.detected, round(d.confidence, 6)] for d in map(r.detect, json.load(sys.stdin))]))"
    )
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == here


def test_explicit_model_or_language_beats_detection():
    router = Router(PACKS)
    swahili = "Bata wa Janet hutaga mayai kila siku."
    assert router.route_prompt(swahili).language == "sw"
    by_model = router.route_prompt(swahili, explicit_model="ja")
    assert (by_model.language, by_model.reason, by_model.detected) == ("ja", "model", "sw")
    assert by_model.header_detected.startswith("sw;q=")  # what the explicit choice overrode
    assert router.route_prompt(swahili, explicit_language="te").reason == "language"
    assert router.route_prompt(swahili, explicit_language="resident").language == "resident"
    with pytest.raises(UnknownLanguageError) as err:
        router.route_prompt(swahili, explicit_model="ru")
    assert err.value.param == "model" and "sw" in str(err.value)
    with pytest.raises(UnknownLanguageError) as err:
        router.route_prompt(swahili, explicit_language="xx")
    assert err.value.param == "language"


def test_chat_routes_on_the_last_user_message():
    router = Router(PACKS)
    messages = [
        {"role": "system", "content": "You are a helpful math tutor. Answer in the user's language."},
        {"role": "user", "content": "ジャネットのアヒルは1日に16個の卵を産みます。"},
        {"role": "assistant", "content": "16"},
        {"role": "user", "content": [{"type": "text", "text": "Bata wa Janet hutaga mayai kila siku."}]},
    ]
    assert router.route_messages(messages).language == "sw"
    assert router.route_messages(messages[:3]).language == "ja"


def test_empty_or_language_free_text_and_low_confidence_go_to_the_resident():
    router = Router(PACKS)
    for text in ["", "   ", "12 + 7 = ?", "$3x+5=20$ 42", "https://example.org/x?y=1", "```\nx = 1\n```"]:
        decision = router.route_prompt(text)
        assert (decision.language, decision.reason) == ("resident", "empty"), text
        assert decision.header_detected == "none;q=0.00"
    picky = Router(PACKS, min_confidence=0.999)
    decision = picky.route_prompt("Habari yako")
    assert decision.language == "resident" and decision.reason == "low_confidence" and decision.detected
    assert decision.header_detected.startswith(f"{decision.detected};q=")


def test_cleaning_removes_latex_code_urls_and_numbers_but_not_prices_prose():
    text, removed = strip_non_language(
        "Solve $$x^2$$ and \\(a+b\\) and $3x+5=20$ see https://x.org/a?b=1, `code`, ```py\nprint(1)\n``` 3,000.50 units"
    )
    assert text == "Solve and and see , units"
    assert removed["latex"] == 3 and removed["url"] == 1 and removed["code"] == 2 and removed["number"] >= 1
    prose, _ = strip_non_language("Anauza kwa $2 kwa kila yai, na $3 kwa kuku.")
    assert prose.split() == ["Anauza", "kwa", "kwa", "kila", "yai,", "na", "kwa", "kuku."]


def test_bad_router_settings_name_the_field():
    with pytest.raises(ModserveError, match="router.candidates"):
        Router(PACKS, candidates=["sw", "klingon"])
    with pytest.raises(ModserveError, match="router.detector"):
        Router(PACKS, detector="cld3")
    with pytest.raises(ModserveError, match="router.fallback"):
        Router(PACKS, fallback="sw")


def test_detect_cli_prints_the_decision_for_a_text_and_a_file(tmp_path, mgsm):
    one = subprocess.run([*MODSERVE, "detect", mgsm["sw"][0]], capture_output=True, text=True, check=True)
    assert "sw" in one.stdout and "detected" in one.stdout
    lines = tmp_path / "questions.txt"
    lines.write_text("\n".join([mgsm["ru"][0], mgsm["ja"][0]]) + "\n")
    table = subprocess.run([*MODSERVE, "detect", "--file", str(lines), "--detector", "langdetect"],
                           capture_output=True, text=True, check=True)
    assert "no_pack" in table.stdout and "ja" in table.stdout
    neither = subprocess.run([*MODSERVE, "detect"], capture_output=True, text=True)
    assert neither.returncode == 1 and "TEXT or --file" in neither.stderr
