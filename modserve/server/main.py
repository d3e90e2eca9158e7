"""`modserve serve`: resolve the config, build engine, router and app, run uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from modserve.config import ServeConfig
from modserve.demo.builtin import ensure_demo
from modserve.engine import create_engine
from modserve.router import Router
from modserve.server.app import create_app

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


def serve(config: ServeConfig, log_level: str = "info") -> int:
    """Run until SIGINT/SIGTERM; in-flight requests get `server.drain_timeout` seconds to finish."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = with_demo(config)
    engine = create_engine(config)
    failure: list[BaseException] = []

    def stop_on_failure(err: BaseException) -> None:
        failure.append(err)
        server.should_exit = True

    app = create_app(config, engine, build_router(config), on_start_failure=stop_on_failure)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_level=log_level,
            timeout_graceful_shutdown=int(config.server.drain_timeout),
        )
    )
    url = f"http://{config.server.host}:{config.server.port}"
    print(f"modserve: serving {config.model.resident} with packs {', '.join(sorted(config.packs)) or 'none'}")
    print(f"modserve: {url}  (OpenAI base URL {url}/v1, metrics {url}/metrics)")
    print(
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
        "'{\"model\": \"modserve\", \"messages\": [{\"role\": \"user\", \"content\": \"Juma ana machungwa 5. Anakula 2. Amebaki na mangapi?\"}]}'"
    )
    server.run()
    return 1 if failure else 0
