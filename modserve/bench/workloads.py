"""Benchmark traffic: real math questions, a language mix, arrivals, a fixed output length."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modserve.errors import ModserveError

# Eight languages for the 1/2/4/8-language points, paper languages first.
BENCH_LANGUAGES = ("sw", "te", "bn", "ja", "th", "zh", "ru", "de")

# A small built-in prompt set (one grade-school problem per language) so the benchmark
# runs anywhere; with --mgsm data/mgsm (the repository's copy), MGSM's 250 questions per
# language are used instead.
BUILTIN_PROMPTS = {
    "sw": "Juma ana machungwa 12. Anampa dada yake 5 na ananunua mengine 8. Ana machungwa mangapi sasa?",
    "te": "రాము దగ్గర 12 మామిడి పండ్లు ఉన్నాయి. అతను 5 తన చెల్లెలికి ఇచ్చి, మరో 8 కొన్నాడు. ఇప్పుడు అతని దగ్గర ఎన్ని ఉన్నాయి?",
    "bn": "রহিমের কাছে ১২টি কমলা আছে। সে তার বোনকে ৫টি দেয় এবং আরও ৮টি কেনে। এখন তার কাছে কয়টি কমলা আছে?",
    "ja": "太郎はみかんを12個持っています。妹に5個あげて、さらに8個買いました。今、みかんは何個ありますか？",
    "th": "สมชายมีส้ม 12 ผล เขาให้น้องสาว 5 ผล และซื้อเพิ่มอีก 8 ผล ตอนนี้เขามีส้มกี่ผล",
    "zh": "小明有12个橘子。他给了妹妹5个，又买了8个。他现在有多少个橘子？",
    "ru": "У Ивана 12 апельсинов. Он дал сестре 5 и купил ещё 8. Сколько апельсинов у него теперь?",
    "de": "Jonas hat 12 Orangen. Er gibt seiner Schwester 5 und kauft noch 8 dazu. Wie viele Orangen hat er jetzt?",
}


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
        return {lang: [BUILTIN_PROMPTS[lang]] for lang in languages}
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
