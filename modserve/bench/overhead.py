"""Router latency per detector and the HTTP server's overhead over the engine it serves."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

from modserve.bench.run import Setup, chat_ids, percentile, timed
from modserve.engine import create_engine


def router_latency(texts: list[str], detectors: tuple[str, ...] = ("py3langid", "langdetect")) -> dict:
    """Per-call latency of each detector backend over the prompts (cleaning included)."""
    from modserve.router import Router

    out = {}
    for name in detectors:
        router = Router(["sw"], detector=name)
        router.route_prompt(texts[0])
        seconds = [router.route_prompt(t).seconds for t in texts for _ in range(max(1, 200 // len(texts)))]
        out[name] = {"p50_us": 1e6 * statistics.median(seconds), "p99_us": 1e6 * percentile(seconds, 0.99), "calls": len(seconds)}
    return out


async def api_overhead(setup: Setup, question: str, repeats: int = 30) -> dict:
    """p50 latency of the same short request through the HTTP server and directly on the engine."""
    import httpx

    from modserve.server.app import create_app
    from modserve.server.main import build_router

    config = setup.config(setup.resident, setup.packs)
    engine = create_engine(config)
    app = create_app(config, engine, build_router(config))
    body = {"model": "modserve:" + next(iter(setup.packs)), "messages": [{"role": "user", "content": question}],
            "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    async with app.router.lifespan_context(app):
        while not engine.ready:
            await asyncio.sleep(0.01)
        transport = httpx.AsyncHTTPTransport()
        server, port = await serve_in_background(app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}") as http:
                http_times, direct_times = [], []
                language = body["model"].split(":")[1]
                prompt = chat_ids(engine, question)
                for k in range(repeats + 3):
                    t = time.perf_counter()
                    response = await http.post("/v1/chat/completions", json=body)
                    response.raise_for_status()
                    http_times.append(time.perf_counter() - t)
                    direct_times.append((await timed(engine, f"api-{k}", prompt, language, 4)).latency)
        finally:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await server.task
    http_p50, direct_p50 = statistics.median(http_times[3:]), statistics.median(direct_times[3:])
    return {"http_p50_ms": 1e3 * http_p50, "direct_p50_ms": 1e3 * direct_p50, "overhead_p50_ms": 1e3 * (http_p50 - direct_p50)}


async def serve_in_background(app):
    """uvicorn on a free loopback port inside this event loop (lifespan already running)."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    server.task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, port
