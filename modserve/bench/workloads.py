"""Benchmark traffic: real math questions, a language mix, arrivals, a fixed output length."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modserve.errors import ModserveError

# Eight languages for the 1/2/4/8-language points, paper languages first.
BENCH_LANGUAGES = ("sw", "te", "bn", "ja", "th", "zh", "ru", "de")

# A small built-in prompt set (one grade-school problem per language, its numbers varied so
# that no two requests share a whole prompt: a prefix cache would otherwise serve every prompt
# after the first for free) so the benchmark runs anywhere; with --mgsm data/mgsm (the
# repository's copy), MGSM's 250 questions per language are used instead.
BUILTIN_PROMPTS = {
    "sw": "Juma ana machungwa {a}. Anampa dada yake {b} na ananunua mengine {c}. Ana machungwa mangapi sasa?",
    "te": "రాము దగ్గర {a} మామిడి పండ్లు ఉన్నాయి. అతను {b} తన చెల్లెలికి ఇచ్చి, మరో {c} కొన్నాడు. ఇప్పుడు అతని దగ్గర ఎన్ని ఉన్నాయి?",
    "bn": "রহিমের কাছে {a}টি কমলা আছে। সে তার বোনকে {b}টি দেয় এবং আরও {c}টি কেনে। এখন তার কাছে কয়টি কমলা আছে?",
    "ja": "太郎はみかんを{a}個持っています。妹に{b}個あげて、さらに{c}個買いました。今、みかんは何個ありますか？",
    "th": "สมชายมีส้ม {a} ผล เขาให้น้องสาว {b} ผล และซื้อเพิ่มอีก {c} ผล ตอนนี้เขามีส้มกี่ผล",
    "zh": "小明有{a}个橘子。他给了妹妹{b}个，又买了{c}个。他现在有多少个橘子？",
    "ru": "У Ивана {a} апельсинов. Он дал сестре {b} и купил ещё {c}. Сколько апельсинов у него теперь?",
    "de": "Jonas hat {a} Orangen. Er gibt seiner Schwester {b} und kauft noch {c} dazu. Wie viele Orangen hat er jetzt?",
}
BUILTIN_VARIANTS = 64
DIGITS = {"bn": str.maketrans("0123456789", "০১২৩৪৫৬৭৮৯")}  # Bengali writes its own digits


def builtin_questions(language: str) -> list[str]:
    """The language's problem with BUILTIN_VARIANTS sets of two-digit numbers (the same sets in
    every language), in the language's own digits."""
    rng = random.Random(0)
    numbers = [(rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)) for _ in range(BUILTIN_VARIANTS)]
    template = BUILTIN_PROMPTS[language]
    return [template.format(a=a, b=b, c=c).translate(DIGITS.get(language, {})) for a, b, c in numbers]



@dataclass(frozen=True)
class BenchRequest:
    language: str
    question: str
    arrival: float  # seconds after the start (0 for closed-loop)


@dataclass(frozen=True)
class Workload:
    languages: tuple[str, ...]
    num_requests: int = 64
    output_len: int = 32
    mix: Literal["uniform", "zipf"] = "uniform"
    rate: float | None = None  # requests/s, Poisson; None: closed loop
    concurrency: int = 16
    seed: int = 0


def load_prompts(mgsm_dir: Path | None, languages: tuple[str, ...]) -> dict[str, list[str]]:
    """Questions per language: MGSM's when given (row i the same problem everywhere), else built-in."""
    if mgsm_dir is None:
        return {lang: builtin_questions(lang) for lang in languages}
    prompts = {}
    for lang in languages:
        file = Path(mgsm_dir) / f"mgsm_{lang}.tsv"
        try:
            prompts[lang] = [line.split("\t")[0] for line in file.read_text(encoding="utf-8").splitlines() if line]
        except OSError as err:
            raise ModserveError(f"--mgsm: cannot read {file} ({err.strerror})") from None
    return prompts


def language_weights(languages: tuple[str, ...], mix: str) -> list[float]:
    """Uniform, or Zipf (s=1): the k-th language gets weight 1/k."""
    if mix == "uniform":
        return [1.0] * len(languages)
    return [1.0 / (k + 1) for k in range(len(languages))]


def make_requests(workload: Workload, prompts: dict[str, list[str]]) -> list[BenchRequest]:
    """Seeded: the same workload gives the same requests in every scenario."""
    rng = random.Random(workload.seed)
    weights = language_weights(workload.languages, workload.mix)
    clock, requests = 0.0, []
    for _ in range(workload.num_requests):
        language = rng.choices(workload.languages, weights)[0]
        if workload.rate:
            clock += rng.expovariate(workload.rate)
        requests.append(BenchRequest(language, rng.choice(prompts[language]), clock))
    return requests
