"""`modserve serve`: resolve the config, build engine, router and app, run uvicorn."""

from __future__ import annotations

import logging
import signal
import time

import uvicorn

from modserve.config import ServeConfig
from modserve.demo.builtin import ensure_demo
from modserve.engine import create_engine
from modserve.router import Router
from modserve.server.app import create_app
from modserve.server.middleware import AppStatus

log = logging.getLogger("modserve.server")


def with_demo(config: ServeConfig) -> ServeConfig:
    """No resident configured: serve the built-in demo, built into the cache dir on first run."""
    if not config.is_demo:
        return config
    demo = ensure_demo()
    model = config.model.model_copy(update={"resident": demo.resident})
    return config.model_copy(update={"model": model, "packs": demo.packs})


def build_router(config: ServeConfig) -> Router:
    r = config.router
    return Router(packs=sorted(config.packs), detector=r.detector, candidates=r.candidates, min_confidence=r.min_confidence)


class DrainingServer(uvicorn.Server):
    """Shutdown as Kubernetes expects it. On SIGTERM (or SIGINT) /ready turns 503 at once and
    new requests get a 503 while the socket stays open; in-flight requests get
    `drain_timeout` seconds to finish; then the server stops and the process exits 0. A
    second SIGINT stops at once."""

    def __init__(self, config: uvicorn.Config, status: AppStatus, drain_timeout: float):
        super().__init__(config)
        self.status, self.drain_timeout = status, drain_timeout
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_started is None:
            log.info("signal %d: draining (%d requests in flight, up to %.1f s)", sig, self.status.in_flight, self.drain_timeout)
            self.status.draining = True
            self.drain_started = time.monotonic()
        elif sig == signal.SIGINT:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            drained = self.status.in_flight == 0
            if drained or time.monotonic() - self.drain_started >= self.drain_timeout:
                if not drained:
                    log.warning("drain timeout: %d requests still in flight are cut", self.status.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(config: ServeConfig, log_level: str = "info") -> int:
    """Run until SIGINT/SIGTERM, then drain (see DrainingServer)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = with_demo(config)
    engine = create_engine(config)
    failure: list[BaseException] = []

    def stop_on_failure(err: BaseException) -> None:
        failure.append(err)
        server.should_exit = True

    app = create_app(config, engine, build_router(config), on_start_failure=stop_on_failure)
    uvicorn_config = uvicorn.Config(
        app, host=config.server.host, port=config.server.port, log_level=log_level,
        timeout_graceful_shutdown=1,  # the drain already ran: only closing connections is left
    )
    server = DrainingServer(uvicorn_config, app.state.status, config.server.drain_timeout)
    url = f"http://{config.server.host}:{config.server.port}"
    print(f"modserve: serving {config.model.resident} with packs {', '.join(sorted(config.packs)) or 'none'}")
    print(f"modserve: {url}  (OpenAI base URL {url}/v1, metrics {url}/metrics)")
    print(
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
        "'{\"model\": \"modserve\", \"messages\": [{\"role\": \"user\", \"content\": \"Juma ana machungwa 5. Anakula 2. Amebaki na mangapi?\"}]}'"
    )
    server.run()
    return 1 if failure else 0
