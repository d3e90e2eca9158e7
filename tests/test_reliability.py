"""The reliability suite, against a real server on loopback: load, faults, fuzz, security.

CI runs the short versions; `make stress` (MODSERVE_STRESS=1) runs them for longer and with
more fuzz cases. The README's Reliability section quotes what these measure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.oracle import hf_greedy
from tests.serving import demo_config, free_port, running_server, scrape, value
from tests.spec import components

STRESS = os.environ.get("MODSERVE_STRESS") == "1"
LOAD_SECONDS = 60 if STRESS else 12
LOAD_CLIENTS = 256
FUZZ_CASES = 2500 if STRESS else 250  # per endpoint and generation mode: 4 x this in all
TARGETS = ["sw", "te", "bn", "ja", "resident"]
FINISHED = ("stop", "length")


def report(name: str, **figures) -> None:
    """One line per test with its figures (`pytest -s` shows them; the README quotes them)."""
    print(f"\n[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def chat_body(language: str, text: str, max_tokens: int, **extra) -> dict:
    return {
        "model": f"modserve:{language}", "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens, "temperature": 0, **extra,
    }


async def stream_chat(http: httpx.AsyncClient, base_url: str, body: dict) -> tuple[list[dict], list[str]]:
    """SSE chunks and raw lines of one streamed chat completion."""
    async with http.stream("POST", f"{base_url}/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        lines = [line async for line in response.aiter_lines() if line]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
    return chunks, lines


def oracle_text(server, merged, language: str, text: str, max_tokens: int) -> str:
    tokenizer = server.engine.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]
    return tokenizer.decode(hf_greedy(merged[language], prompt, max_tokens), skip_special_tokens=True)


def assert_still_correct(server, merged) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200
    for language in ("sw", "resident"):
        body = chat_body(language, f"still right? ({language})", 12)
        answer = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["message"]["content"] == oracle_text(server, merged, language, body["messages"][0]["content"], 12)


# --- load --------------------------------------------------------------------------------------


def test_256_concurrent_mixed_language_streams_lose_nothing_and_the_metrics_agree(demo, merged):
    with running_server(demo_config(demo)) as server:
        before = scrape(server)
        completed: Counter = Counter()
        tokens: Counter = Counter()
        rss: list[int] = []
        process = psutil.Process()

        async def client(k: int, deadline: float, http: httpx.AsyncClient) -> None:
            rng = random.Random(k)
            while time.monotonic() < deadline:
                language = TARGETS[rng.randrange(len(TARGETS))]
                body = chat_body(language, f"client {k} asks in {language}", rng.randint(2, 16),
                                 stream_options={"include_usage": True})
                chunks, lines = await stream_chat(http, server.base_url, body)
                assert lines[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
                reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
                assert len(reasons) == 1 and reasons[0] in FINISHED
                completed[language] += 1
                tokens[language] += chunks[-1]["usage"]["completion_tokens"]

        async def sample_memory(deadline: float) -> None:
            while time.monotonic() < deadline:
                rss.append(process.memory_info().rss)
                await asyncio.sleep(0.5)

        async def run() -> None:
            limits = httpx.Limits(max_connections=LOAD_CLIENTS + 8, max_keepalive_connections=LOAD_CLIENTS + 8)
            async with httpx.AsyncClient(timeout=300, limits=limits) as http:
                deadline = time.monotonic() + LOAD_SECONDS
                await asyncio.gather(sample_memory(deadline), *(client(k, deadline, http) for k in range(LOAD_CLIENTS)))

        started = time.monotonic()
        asyncio.run(run())
        seconds = time.monotonic() - started
        after = scrape(server)
        stats = server.engine.stats()

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert sum(completed.values()) >= LOAD_CLIENTS and set(completed) == set(TARGETS)
    for language in TARGETS:
        assert delta("modserve_requests_total", endpoint="chat", language=language, status="200") == completed[language]
        assert delta("modserve_generation_tokens_total", language=language) == tokens[language]
    errors = [k for k in after if k[0] == "modserve_requests_total" and dict(k[1])["status"] != "200"]
    assert not any(delta(name, **dict(labels)) for name, labels in errors)
    assert stats.running == stats.waiting == stats.kv_tokens_used == 0
    third = len(rss) // 3
    growth_mb = (max(rss[third:]) - max(rss[:third])) / 2**20  # after warm-up: flat
    assert growth_mb < 64, growth_mb
    report("load", clients=LOAD_CLIENTS, seconds=round(seconds, 1), requests=sum(completed.values()), lost=0,
           tokens=sum(tokens.values()), tokens_per_s=round(sum(tokens.values()) / seconds),
           rss_growth_mb=round(growth_mb, 1))


# --- faults ------------------------------------------------------------------------------------


def test_fifty_clients_cut_mid_stream_free_their_slots_at_once(demo, merged):
    with running_server(demo_config(demo)) as server:

        async def cut(k: int, http: httpx.AsyncClient) -> None:
            body = chat_body(TARGETS[k % len(TARGETS)], f"cut {k}", 400, stream=True, ignore_eos=True)
            async with http.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
                lines = response.aiter_lines()
                await lines.__anext__()  # the first chunk, then the client is gone

        async def run() -> None:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
                await asyncio.gather(*(cut(k, http) for k in range(50)))

        asyncio.run(run())
        deadline = time.monotonic() + 1  # at once: not when the requests would have ended
        while (stats := server.engine.stats()).running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stats.running == stats.waiting == stats.kv_tokens_used == 0
        assert_still_correct(server, merged)


def serve_demo(tmp_path, **env) -> tuple[subprocess.Popen, str]:
    """`modserve serve` on the demo in a process of its own (signals need one)."""
    port = free_port()
    environ = {**os.environ, "MODSERVE_CACHE": str(tmp_path / "cache"), "MODSERVE_SERVER_PORT": str(port), **env}
    proc = subprocess.Popen([sys.executable, "-m", "modserve", "serve"], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server never became ready")


def test_sigterm_turns_ready_off_refuses_new_requests_lets_streams_finish_and_exits_0(tmp_path):
    proc, url = serve_demo(tmp_path, MODSERVE_SERVER_DRAIN_TIMEOUT="60")
    try:

        async def run() -> tuple[list, dict]:
            async with httpx.AsyncClient(timeout=120) as http:
                streams = []
                for k in range(3):
                    body = chat_body("sw", f"drain {k}", 150, stream=True, ignore_eos=True)
                    streams.append(await http.send(http.build_request("POST", f"{url}/v1/chat/completions", json=body), stream=True))
                lines = [response.aiter_lines() for response in streams]  # kept: a dropped iterator closes its stream
                for first in lines:
                    await first.__anext__()
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                during = {
                    "ready": await http.get(f"{url}/ready"),
                    "health": await http.get(f"{url}/health"),
                    "new": await http.post(f"{url}/v1/chat/completions", json=chat_body("te", "too late", 4)),
                }
                rest = [[line async for line in stream if line] for stream in lines]
                return rest, during

        rest, during = asyncio.run(run())
        assert during["ready"].status_code == 503 and during["ready"].json()["error"]["code"] == "draining"
        assert during["health"].status_code == 200
        refused = during["new"]
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        for lines in rest:
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_fractional_drain_timeout_is_honoured_and_still_exits_0(tmp_path):
    proc, url = serve_demo(tmp_path, MODSERVE_SERVER_DRAIN_TIMEOUT="0.5")
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json=chat_body("sw", "too long to drain", 1500, stream=True, ignore_eos=True)) as response:
            lines = response.iter_lines()
            next(lines)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):  # cut when the drain time is up
                for _ in lines:
                    pass
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - start
        assert 0.4 < took < 5, took
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_pack_corrupted_and_a_pack_deleted_while_serving_fail_their_language_alone(demo, merged, tmp_path):
    packs = {lang: shutil.copytree(pack, tmp_path / pack.name) for lang, pack in demo.packs.items()}
    one_pack = int((demo.packs["sw"] / "blocks.safetensors").stat().st_size * 1.5)
    config = demo_config(demo, packs={k: str(v) for k, v in packs.items()},
                         engine={"pack_memory": one_pack, "host_pack_memory": 0})
    with running_server(config) as server:
        blob = bytearray((packs["te"] / "blocks.safetensors").read_bytes())
        blob[-64] ^= 0x10
        (packs["te"] / "blocks.safetensors").write_bytes(bytes(blob))
        shutil.rmtree(packs["bn"])
        before = scrape(server)
        for language in ["te", "bn", "sw", "te", "resident", "bn", "sw"]:
            body = chat_body(language, f"pack trouble ({language})", 8)
            response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
            if language in ("te", "bn"):
                error = response.json()["error"]
                assert response.status_code == 503 and error["code"] == "pack_unavailable", language
                assert str(tmp_path) not in error["message"] and "model.layers" not in error["message"]
                assert response.headers["retry-after"]
            else:
                assert response.status_code == 200
                assert response.json()["choices"][0]["message"]["content"] == oracle_text(server, merged, language, body["messages"][0]["content"], 8)
        after = scrape(server)
    for language in ("te", "bn"):
        assert value(after, "modserve_pack_load_failures_total", language=language) >= 1
        served = value(after, "modserve_requests_total", endpoint="chat", language=language, status="503")
        assert served - value(before, "modserve_requests_total", endpoint="chat", language=language, status="503") == 2


def test_pool_pressure_one_pack_slot_under_five_targets_stays_exact(demo, merged):
    one_pack = int((demo.packs["sw"] / "blocks.safetensors").stat().st_size * 1.5)
    config = demo_config(demo, engine={"pack_memory": one_pack, "host_pack_memory": one_pack, "max_batch_size": 4})
    with running_server(config) as server:

        async def run():
            async with httpx.AsyncClient(timeout=120) as http:
                bodies = [chat_body(TARGETS[k % 5], f"pressure {k}", 10) for k in range(15)]
                answers = await asyncio.gather(*(http.post(f"{server.base_url}/chat/completions", json=b) for b in bodies))
                return bodies, answers

        bodies, answers = asyncio.run(run())
        for body, answer in zip(bodies, answers, strict=True):
            language = body["model"].split(":")[1]
            want = oracle_text(server, merged, language, body["messages"][0]["content"], 10)
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == want
        samples = scrape(server)
    loads = sum(v for (name, _), v in samples.items() if name == "modserve_pack_loads_total")
    report("pool pressure", targets=5, requests=15, pack_slots=1, pack_loads=int(loads), exact=15)


def test_an_engine_step_that_raises_fails_its_batch_alone_and_is_counted(demo, merged):
    with running_server(demo_config(demo)) as server:
        before = scrape(server)

        async def run() -> list[list[dict]]:
            async with httpx.AsyncClient(timeout=120) as http:
                responses = [
                    await http.send(http.build_request("POST", f"{server.base_url}/chat/completions",
                                                       json=chat_body(TARGETS[k], f"unlucky {k}", 200, stream=True, ignore_eos=True)),
                                    stream=True)
                    for k in range(4)
                ]
                lines = [response.aiter_lines() for response in responses]  # kept: a dropped iterator closes its stream
                for first in lines:
                    await first.__anext__()
                server.engine.faults.fail_steps(1)
                return [[json.loads(line[6:]) for line in [x async for x in stream if x][:-1]] for stream in lines]

        streams = asyncio.run(run())
        after = scrape(server)
        for chunks in streams:
            assert "error" in chunks[-1] and "injected" not in chunks[-1]["error"]["message"]
        assert value(after, "modserve_engine_step_failures_total") - value(before, "modserve_engine_step_failures_total") == 1
        failed = sum(value(after, "modserve_requests_total", endpoint="chat", language=t, status="500")
                     - value(before, "modserve_requests_total", endpoint="chat", language=t, status="500") for t in TARGETS)
        assert failed == 4  # streams that failed after their 200 count as errors
        assert_still_correct(server, merged)


def test_a_dead_engine_loop_fails_every_request_at_once_and_health_says_so(demo):
    with running_server(demo_config(demo)) as server:

        async def run():
            async with httpx.AsyncClient(timeout=30) as http:
                stream = await http.send(http.build_request("POST", f"{server.base_url}/chat/completions",
                                                            json=chat_body("sw", "doomed", 400, stream=True, ignore_eos=True)), stream=True)
                lines = stream.aiter_lines()
                await lines.__anext__()
                pending = asyncio.ensure_future(http.post(f"{server.base_url}/chat/completions",
                                                          json=chat_body("te", "doomed too", 400, ignore_eos=True)))
                await asyncio.sleep(0.2)
                server.engine.faults.kill_loop = True
                lines = [line async for line in lines if line]
                start = time.monotonic()
                after = {
                    "health": await http.get(f"{server.url}/health"),
                    "ready": await http.get(f"{server.url}/ready"),
                    "new": await http.post(f"{server.base_url}/completions", json={"model": "modserve", "prompt": "hi"}),
                }
                return lines, await pending, after, time.monotonic() - start

        lines, pending, after, took = asyncio.run(run())
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "engine_dead"
    assert pending.status_code == 503 and pending.json()["error"]["code"] == "engine_dead"
    assert after["health"].status_code == 503 and after["ready"].status_code == 503
    assert after["new"].status_code == 503 and after["new"].headers["retry-after"] and took < 2


# --- fuzz --------------------------------------------------------------------------------------


def fuzz_operation(operation, mode: GenerationMode, url: str, statuses: Counter, params: Counter | None = None) -> None:
    """Positive cases name one of our models (any other string is a quick 404), so they reach
    routing, the engine and the stream; negative ones are whatever breaks the schema."""
    models = ["modserve", *(f"modserve:{t}" for t in TARGETS)]

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=operation.as_strategy(generation_mode=mode), pick=st.integers(0, len(models)))
    def fuzz(case, pick):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and pick < len(models):
            case.body["model"] = models[pick]
        response = case.call(base_url=url, timeout=120)
        statuses[(operation.path, mode.value, response.status_code)] += 1
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text[:500]
            if params is not None:
                params[(response.status_code, response.json()["error"]["param"])] += 1

    fuzz()


def test_fuzzing_both_completion_endpoints_never_yields_a_5xx_and_leaves_the_server_correct(demo, merged):
    """Schemathesis over the server's own OpenAPI schema, valid and invalid bodies alike."""
    config = demo_config(demo, engine={"max_model_len": 64, "max_batch_size": 64})
    with running_server(config) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        statuses: Counter = Counter()
        for path in ("/v1/chat/completions", "/v1/completions"):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz_operation(schema[path]["POST"], mode, server.url, statuses)
        assert_still_correct(server, merged)
    total = sum(statuses.values())
    assert total >= 4 * FUZZ_CASES * 0.9  # hypothesis may stop early on a small space
    by_status = Counter()
    for (_, _, status), count in statuses.items():
        by_status[status] += count
    report("fuzz", cases=total, **{f"status_{s}": n for s, n in sorted(by_status.items())}, server_errors=0)


def test_fuzzing_with_the_openai_specs_own_request_schemas_never_yields_a_5xx(demo, merged):
    """Positive cases of OpenAI's CreateChatCompletionRequest / CreateCompletionRequest: bodies
    OpenAI would accept. modserve serves them, or refuses them naming the field (a 400 that
    says which field it cannot honour), never a 5xx."""
    request_body = lambda name: {  # noqa: E731
        "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
    }
    operation = lambda name: {"post": {"requestBody": request_body(name), "responses": {"200": {"description": "ok"}}}}  # noqa: E731
    document = {
        "openapi": "3.1.0", "info": {"title": "OpenAI (requests)", "version": "spec"}, "components": components(),
        "paths": {"/v1/chat/completions": operation("CreateChatCompletionRequest"), "/v1/completions": operation("CreateCompletionRequest")},
    }
    config = demo_config(demo, engine={"max_model_len": 64, "max_batch_size": 64})
    with running_server(config) as server:
        schema = schemathesis.openapi.from_dict(document)
        statuses: Counter = Counter()
        params: Counter = Counter()
        for path in document["paths"]:
            fuzz_operation(schema[path]["POST"], GenerationMode.POSITIVE, server.url, statuses, params)
        assert_still_correct(server, merged)
    by_status = Counter()
    for (_, _, status), count in statuses.items():
        by_status[status] += count
    assert by_status[200] > 0 and not any(status >= 500 for status in by_status)
    top = ", ".join(f"{status}:{param}={n}" for (status, param), n in params.most_common(12))
    report("fuzz, OpenAI's request schemas", cases=sum(by_status.values()), **{f"status_{s}": n for s, n in sorted(by_status.items())},
           by_field=top)


# --- security ----------------------------------------------------------------------------------


def test_api_keys_guard_every_v1_route(demo):
    with running_server(demo_config(demo, server={"api_keys": ["sk-only-this-one"]})) as server:
        routes = [(route.path, method) for route in server.app.routes if route.path.startswith("/v1")
                  for method in sorted(getattr(route, "methods", ()))]
        assert len(routes) >= 3
        for path, method in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-only-this-one"}):
                response = httpx.request(method, f"{server.url}{path}", headers=headers, json={})
                assert response.status_code == 401, (path, method, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{server.url}{path}").status_code == 200


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_reach_the_log_only_when_asked_and_keys_never(demo, caplog, log_prompts):
    key, marker = "sk-secret-4f1c", "PROMPT-MARKER-93c2"
    caplog.set_level(logging.DEBUG)
    config = demo_config(demo, server={"api_keys": [key], "log_prompts": log_prompts})
    with running_server(config) as server:
        headers = {"Authorization": f"Bearer {key}"}
        for stream in (False, True):
            chat = httpx.post(f"{server.base_url}/chat/completions", headers=headers,
                              json=chat_body("sw", f"{marker} chat", 4, stream=stream))
            legacy = httpx.post(f"{server.base_url}/completions", headers=headers,
                                json={"model": "modserve", "prompt": f"{marker} legacy", "max_tokens": 4, "stream": stream})
            assert chat.status_code == legacy.status_code == 200
        httpx.post(f"{server.base_url}/chat/completions", headers={"Authorization": "Bearer sk-wrong-9d2e"}, json={})
    logged = caplog.text
    assert (marker in logged) == log_prompts
    assert key not in logged and "sk-wrong-9d2e" not in logged


def test_label_sets_stay_bounded_after_a_thousand_requests_with_random_languages_and_models(demo):
    rng = random.Random(7)
    scripts = ["abcdefghij", "абвгдежзик", "αβγδεζηθικ", "あいうえおかきくけこ", "अआइईउऊएऐओऔ", "ابتثجحخدذر", "กขคงจฉชซฌญ"]
    with running_server(demo_config(demo)) as server:

        async def one(k: int, http: httpx.AsyncClient):
            junk = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz:-_é☃") for _ in range(rng.randint(1, 12)))
            model = rng.choice(["modserve", f"modserve:{junk}", junk, "modserve:sw"])
            text = " ".join("".join(rng.choice(rng.choice(scripts)) for _ in range(rng.randint(2, 8))) for _ in range(6))
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
            if rng.random() < 0.3:
                body["language"] = junk
            return (await http.post(f"{server.base_url}/chat/completions", json=body)).status_code

        async def run():
            async with httpx.AsyncClient(timeout=60) as http:
                return Counter([await one(k, http) for k in range(1000)])

        statuses = asyncio.run(run())
        samples = scrape(server)
    labels: dict[str, set] = {}
    for _, pairs in samples:
        for name, label in pairs:
            labels.setdefault(name, set()).add(label)
    assert labels["language"] <= {*TARGETS, "none", "mixed", "other"}
    assert labels["status"] <= {"200", "400", "404"} and len(labels["detected"]) <= 100
    assert labels["routed"] <= set(TARGETS)
    assert len(samples) < 2000
    report("labels", requests=1000, statuses=dict(statuses), series=len(samples),
           detected_values=len(labels["detected"]), language_values=sorted(labels["language"]))
