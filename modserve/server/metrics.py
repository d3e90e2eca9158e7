"""Prometheus metrics: what operators watch per language, pack tier and step.

Every label set is bounded: `language` is a pack code or `resident`, `detected`
is a detector label (a closed inventory) or `none`, `status` an HTTP code.
Gauges that mirror engine state are read from `Engine.stats()` at scrape time,
so they are never stale and the engine never imports this module.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from modserve.engine.base import RESIDENT, Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
DETECTION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")


class Metrics:
    """All modserve metrics on one registry; also the engine's observer."""

    def __init__(self, languages: list[str]):
        # `none`: refused before routing; `mixed`: a multi-prompt completion across languages.
        self.languages = frozenset([*languages, RESIDENT, "none", "mixed"])
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "modserve_requests", "Requests answered, by endpoint, served language and HTTP status",
            ["endpoint", "language", "status"], registry=r,
        )
        self.request_duration = Histogram(
            "modserve_request_duration_seconds", "Time from request arrival to the last byte",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "modserve_time_to_first_token_seconds", "Time from request arrival to the first token",
            ["language"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "modserve_inter_token_latency_seconds", "Time between consecutive tokens of a stream",
            ["language"], buckets=TOKEN_GAP_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "modserve_prompt_tokens", "Prompt tokens processed", ["language"], registry=r
        )
        self.generation_tokens = Counter(
            "modserve_generation_tokens", "Tokens generated", ["language"], registry=r
        )
        self.detections = Counter(
            "modserve_language_detections", "Detections, by detected language and where routed",
            ["detected", "routed"], registry=r,
        )
        self.detection_seconds = Histogram(
            "modserve_language_detection_seconds", "Time to detect one request's language",
            buckets=DETECTION_BUCKETS, registry=r,
        )
        self.pack_loads = Counter(
            "modserve_pack_loads", "Packs brought to the device, by source tier",
            ["language", "source"], registry=r,
        )
        self.pack_load_seconds = Histogram(
            "modserve_pack_load_seconds", "Time to bring a pack to the device",
            ["source"], buckets=LOAD_BUCKETS, registry=r,
        )
        self.pack_load_failures = Counter(
            "modserve_pack_load_failures", "Packs refused at load (corrupted, wrong resident)",
            ["language"], registry=r,
        )
        self.pack_swaps = Counter(
            "modserve_pack_swaps", "In-place swaps of a pack's layers into the model",
            ["language"], registry=r,
        )
        self.pack_swap_seconds = Histogram(
            "modserve_pack_swap_seconds", "Time of one in-place swap", buckets=LOAD_BUCKETS, registry=r
        )
        self.step_failures = Counter(
            "modserve_engine_step_failures", "Engine steps that raised (their batch failed; the engine went on)",
            registry=r,
        )
        self.batch_languages = Histogram(
            "modserve_batch_languages", "Distinct languages in one decode step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r,
        )

    def language(self, language: str) -> str:
        return language if language in self.languages else "other"

    def detected(self, label: str | None) -> str:
        return label if label and LANGUAGE_CODE.match(label) else "none"

    def watch(self, engine: Engine) -> None:
        """Gauges read off the engine at every scrape."""
        self.registry.register(EngineCollector(engine))

    # --- EngineObserver --------------------------------------------------------------------

    def pack_loaded(self, language: str, source: str, seconds: float) -> None:
        self.pack_loads.labels(self.language(language), source).inc()
        self.pack_load_seconds.labels(source).observe(seconds)

    def pack_load_failed(self, language: str, reason: str) -> None:
        self.pack_load_failures.labels(self.language(language)).inc()

    def pack_swapped(self, language: str, seconds: float) -> None:
        self.pack_swaps.labels(self.language(language)).inc()
        self.pack_swap_seconds.observe(seconds)

    def step(self, languages: int, batch_size: int) -> None:
        self.batch_languages.observe(languages)

    def step_failed(self) -> None:
        self.step_failures.inc()


class EngineCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def describe(self) -> list:
        return []  # collected lazily: the engine may not be loaded at registration

    def collect(self):
        stats = self.engine.stats()
        running = GaugeMetricFamily("modserve_running_requests", "Requests in the running batch")
        running.add_metric([], stats.running)
        waiting = GaugeMetricFamily("modserve_waiting_requests", "Requests queued, not yet running")
        waiting.add_metric([], stats.waiting)
        by_language = GaugeMetricFamily(
            "modserve_language_waiting_requests", "Requests queued, by language", labels=["language"]
        )
        for language, count in sorted(stats.waiting_by_language.items()):
            by_language.add_metric([language], count)
        packs = GaugeMetricFamily("modserve_packs_resident", "Packs per memory tier", labels=["tier"])
        pack_bytes = GaugeMetricFamily("modserve_pack_bytes", "Pack bytes per memory tier", labels=["tier"])
        for tier, count in sorted(stats.packs_by_tier.items()):
            packs.add_metric([tier], count)
            pack_bytes.add_metric([tier], stats.pack_bytes_by_tier.get(tier, 0))
        resident = GaugeMetricFamily("modserve_resident_bytes", "Bytes of the resident model's weights")
        resident.add_metric([], stats.resident_bytes)
        kv = GaugeMetricFamily("modserve_kv_cache_usage_ratio", "Share of KV-cache token capacity in use")
        kv.add_metric([], stats.kv_tokens_used / stats.kv_tokens_capacity if stats.kv_tokens_capacity else 0.0)
        yield from (running, waiting, by_language, packs, pack_bytes, resident, kv)
