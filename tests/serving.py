"""A real uvicorn server on loopback, in a thread of the test process, for API tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from modserve.config import ServeConfig, load_serve_config
from modserve.engine import create_engine
from modserve.engine.base import Engine
from modserve.server.app import create_app
from modserve.server.main import build_router


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(demo, **sections) -> ServeConfig:
    """The demo's resident and packs, fp32 on CPU, plus section overrides."""
    flags = {
        "model": {"resident": str(demo.resident), "dtype": "float32", "device": "cpu"},
        "packs": {lang: str(p) for lang, p in demo.packs.items()},
        "engine": {"max_model_len": 512},
    }
    for section, values in sections.items():
        flags[section] = {**flags.get(section, {}), **values} if isinstance(values, dict) else values
    return load_serve_config(None, flags, environ={})


@dataclass
class RunningServer:
    url: str
    engine: Engine
    app: object

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


@contextlib.contextmanager
def running_server(config: ServeConfig) -> Iterator[RunningServer]:
    engine = create_engine(config)
    app = create_app(config, engine, build_router(config))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # vLLM starts in tens of seconds on a busy machine
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                break
        time.sleep(0.05)
    else:
        server.should_exit = True
        raise RuntimeError("server did not become ready")
    try:
        yield RunningServer(url, engine, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
