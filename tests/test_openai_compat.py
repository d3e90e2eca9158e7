"""Fluent in OpenAI and vLLM: the spec's own schemas, prompt log-probabilities, structured
outputs, tools, vLLM's extra fields and utility endpoints — on a real server, native backend."""

from __future__ import annotations

import json
import logging

import httpx
import jsonschema
import openai
import pytest

from tests.engine_helpers import ANSWER
from tests.oracle import hf_greedy, hf_logprobs, hf_model
from tests.serving import demo_config, running_server
from tests.spec import check

ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def server(demo):
    with running_server(demo_config(demo)) as running:
        yield running


def chat(server, **body) -> httpx.Response:
    body = {"model": "modserve", "messages": [{"role": "user", "content": "How many eggs?"}], "max_tokens": 24, **body}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)


def legacy(server, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}/completions", json={"model": "modserve", "max_tokens": 8, **body}, timeout=60)


def sse_chunks(response: httpx.Response) -> list[dict]:
    lines = [line for line in response.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def prompt_ids(server, text: str) -> list[int]:
    return server.engine.tokenizer(text)["input_ids"]


# --- the spec's own schemas ------------------------------------------------------------------


def test_every_kind_of_response_validates_against_the_openai_spec(server):
    validated = 0

    def hold(name: str, payload: dict) -> None:
        nonlocal validated
        check(name, payload)
        validated += 1

    responses = [
        ("chat", chat(server)), ("chat", chat(server, n=2, temperature=1, seed=1)),
        ("chat", chat(server, logprobs=True, top_logprobs=2, stop=["e"])),
        ("chat", chat(server, response_format={"type": "json_object"})),
        ("chat", chat(server, tools=TOOLS, tool_choice="required")),
        ("chat", chat(server, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})),
        ("chat", chat(server, messages=[{"role": "function", "name": "now", "content": "noon"}, {"role": "user", "content": "x"}])),
        ("chat", chat(server, stream=None, n=None, logprobs=None)),  # explicit nulls
        ("completion", legacy(server, prompt="Swali")), ("completion", legacy(server, prompt=[[65, 66], [67]], n=2)),
        ("completion", legacy(server, prompt="Swali", echo=True, logprobs=2)),
        ("completion", legacy(server, prompt="Swali", echo=True, logprobs=0, max_tokens=0)),
        ("completion", legacy(server, prompt="Swali", logprobs=3, echo=None)),
    ]
    for kind, response in responses:
        assert response.status_code == 200, response.text
        hold("CreateChatCompletionResponse" if kind == "chat" else "CreateCompletionResponse", response.json())
    streams = [
        ("chat", chat(server, stream=True)), ("chat", chat(server, stream=True, n=2, stream_options={"include_usage": True})),
        ("chat", chat(server, stream=True, logprobs=True, top_logprobs=1)),
        ("chat", chat(server, stream=True, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})),
        ("chat", chat(server, stream=True, tools=TOOLS, tool_choice="required")),
        ("completion", legacy(server, prompt="Swali", stream=True, stream_options={"include_usage": True})),
        ("completion", legacy(server, prompt="Swali", stream=True, echo=True, logprobs=1)),
    ]
    for kind, response in streams:
        chunks = sse_chunks(response)
        if kind == "chat":  # each choice's role comes in its first delta only
            roles: dict[int, list] = {}
            for chunk in chunks:
                for c in chunk["choices"]:
                    roles.setdefault(c["index"], []).append(c["delta"].get("role"))
            assert all(r[0] == "assistant" and not any(r[1:]) for r in roles.values())
        assert all("usage" not in chunk or chunk["usage"] is not None for chunk in chunks)
        for chunk in chunks:
            hold("CreateChatCompletionStreamResponse" if kind == "chat" else "CreateCompletionResponse", chunk)
    hold("ListModelsResponse", httpx.get(f"{server.base_url}/models").json())
    for model_id in ("modserve", "modserve:sw", "modserve:resident"):
        hold("Model", httpx.get(f"{server.base_url}/models/{model_id}").json())
    errors = [
        chat(server, temperature=9), chat(server, model="gpt-4o"), legacy(server, prompt="x", suffix="y"),
        httpx.get(f"{server.base_url}/models/nope"), httpx.get(f"{server.url}/v1/nowhere"), httpx.delete(f"{server.base_url}/models"),
        httpx.post(f"{server.base_url}/completions", content=b"x" * (2 << 20)),
    ]
    assert sorted({r.status_code for r in errors}) == [400, 404, 405, 413]
    for response in errors:
        hold("ErrorResponse", response.json())
    print(f"\n[openai spec] {validated} responses validated, 0 failed")


def test_system_fingerprint_says_which_weights_answered(server):
    prints = {lang: chat(server, model=f"modserve:{lang}").json()["system_fingerprint"] for lang in ("sw", "te", "resident")}
    assert len(set(prints.values())) == 3 and all(p.startswith("fp_") for p in prints.values())
    assert chat(server, model="modserve:sw").json()["system_fingerprint"] == prints["sw"]


# --- prompt log-probabilities ---------------------------------------------------------------


def test_echo_with_logprobs_scores_the_prompt_like_transformers_on_the_merge(server, merged):
    text = "Juma ana machungwa 5"
    ids = prompt_ids(server, text)
    body = legacy(server, model="modserve:sw", prompt=text, echo=True, logprobs=2, max_tokens=3, temperature=0).json()
    choice = choice_of(body)
    generated = hf_greedy(merged["sw"], ids, 3)
    reference = hf_logprobs(merged["sw"], ids[:1], ids[1:] + generated)  # teacher-forced over prompt and answer
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(ids) + 3 and choice["text"].startswith(text)
    for position, token in enumerate(ids[1:] + generated, start=1):
        assert lp["token_logprobs"][position] == pytest.approx(reference[position - 1, token].item(), abs=1e-3)
    assert lp["text_offset"][: len(ids)] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    scored_only = choice_of(legacy(server, model="modserve:sw", prompt=ids, echo=True, logprobs=0, max_tokens=0).json(),
                            usage=lambda u: u["completion_tokens"] == 0)
    assert scored_only["text"] == text and scored_only["logprobs"]["token_logprobs"] == lp["token_logprobs"][: len(ids)]


def choice_of(body: dict, usage=lambda u: True) -> dict:
    assert usage(body["usage"]), body["usage"]
    return body["choices"][0]


def test_vllms_prompt_logprobs_field_reports_each_prompt_tokens_rank_and_alternatives(server, merged):
    ids = prompt_ids(server, "Swali la hesabu")
    reference = hf_logprobs(merged["te"], ids[:1], ids[1:])
    for body in (
        legacy(server, model="modserve:te", prompt=ids, prompt_logprobs=2, max_tokens=1).json()["choices"][0],
        chat(server, model="modserve:te", prompt_logprobs=0, max_tokens=1).json(),
    ):
        entries = body["prompt_logprobs"]
        assert entries[0] is None and all(len(e) >= 1 for e in entries[1:])
    entries = legacy(server, model="modserve:te", prompt=ids, prompt_logprobs=2, max_tokens=1).json()["choices"][0]["prompt_logprobs"]
    for position, token in enumerate(ids[1:], start=1):
        mine = entries[position][str(token)]
        assert mine["logprob"] == pytest.approx(reference[position - 1, token].item(), abs=1e-3)
        assert mine["rank"] == int((reference[position - 1] > reference[position - 1, token]).sum()) + 1


# --- structured outputs and tools -------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0, 1])
def test_every_output_of_a_mixed_language_batch_parses_and_validates_against_its_schema(server, temperature):
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}

    async def ask(k: int, language: str):
        return await client.chat.completions.create(
            model=f"modserve:{language}", messages=[{"role": "user", "content": f"{k} questions in {language}"}],
            max_tokens=48, temperature=temperature, seed=k, n=2, response_format=fmt,
        )

    async def free(language: str):  # unconstrained rows in the same batches
        return await client.chat.completions.create(model=f"modserve:{language}", max_tokens=48,
                                                    messages=[{"role": "user", "content": "anything"}])

    import asyncio

    async def run():
        languages = ["sw", "te", "bn", "ja", "resident"] * 2
        return await asyncio.gather(*(ask(k, lang) for k, lang in enumerate(languages)), *(free(lang) for lang in languages))

    results = asyncio.run(run())
    for completion in results[:10]:
        for choice in completion.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), ANSWER)
    assert any(not c.message.content.startswith("{") for r in results[10:] for c in r.choices)  # those stayed free


def test_vllms_structured_output_fields_constrain_both_endpoints(server):
    cases = [
        ({"choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[:3].isdigit() and t[3] == "-"),
        ({"grammar": 'root ::= "a" ("b" | "c") ("b" | "c") "."'}, lambda t: len(t) == 4 and t[0] == "a" and t[3] == "."),
        ({"json": ADD}, lambda t: jsonschema.validate(json.loads(t), ADD) is None),
    ]
    for constraint, holds in cases:
        text = legacy(server, prompt="hi", structured_outputs=constraint, max_tokens=30).json()["choices"][0]["text"]
        assert holds(text), (constraint, text)
        content = chat(server, structured_outputs=constraint, max_tokens=30).json()["choices"][0]["message"]["content"]
        assert holds(content), (constraint, content)


def test_constraints_that_cannot_hold_are_400s_naming_their_field(server):
    for body, param in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ]:
        response = chat(server, **body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)


def test_a_named_tool_is_called_with_arguments_that_fit_its_parameters(server):
    choice = chat(server, temperature=0, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "add" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), ADD)
    streamed = streamed_calls(chat(server, temperature=0, stream=True, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}))
    assert [(c["name"], c["arguments"]) for c in streamed] == [("add", call["function"]["arguments"])]


def test_required_tool_calls_are_one_or_more_of_the_tools_and_parallel_false_means_one(server):
    for parallel in (True, False):
        choice = chat(server, temperature=0, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, max_tokens=60).json()["choices"][0]
        calls = choice["message"]["tool_calls"]
        assert choice["finish_reason"] == "tool_calls" and calls and (parallel or len(calls) == 1)
        for call in calls:
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["function"]["name"])
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
        streamed = streamed_calls(chat(server, temperature=0, stream=True, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, max_tokens=60))
        assert [(c["name"], c["arguments"]) for c in streamed] == [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def streamed_calls(response: httpx.Response) -> list[dict]:
    """Tool-call deltas accumulated as clients do: by index, arguments concatenated."""
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in sse_chunks(response):
        for choice in chunk["choices"]:
            reasons.append(choice.get("finish_reason"))
            for delta in choice["delta"].get("tool_calls") or []:
                entry = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
                entry["name"] += (delta.get("function") or {}).get("name", "")
                entry["arguments"] += (delta.get("function") or {}).get("arguments", "")
    assert reasons[-1] == "tool_calls"
    return [calls[k] for k in sorted(calls)]


def test_tool_choice_none_ignores_the_tools_and_auto_is_refused_saying_what_works(server):
    plain = chat(server, model="modserve:ja", temperature=0).json()["choices"][0]["message"]["content"]
    ignored = chat(server, model="modserve:ja", temperature=0, tools=TOOLS, tool_choice="none").json()["choices"][0]
    assert ignored["message"]["content"] == plain and "tool_calls" not in ignored["message"]
    refused = chat(server, tools=TOOLS, tool_choice="auto").json()["error"]
    assert refused["param"] == "tool_choice" and "required" in refused["message"] and "none" in refused["message"]


# --- vLLM's sampling extensions, streaming usage ----------------------------------------------


def test_min_tokens_holds_off_the_end_like_transformers_min_new_tokens(server, merged):
    """A logit_bias makes the end token likely (greedy stops after 2 tokens); min_tokens holds
    it off, exactly as transformers' min_new_tokens does."""
    import torch

    ids = server.engine.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)["input_ids"]
    body = {"model": "modserve:sw", "prompt": ids, "max_tokens": 40, "temperature": 0, "logit_bias": {"260": 6.0}}
    assert legacy(server, **body).json()["usage"]["completion_tokens"] == 2
    with torch.inference_mode():
        held = hf_model(merged["sw"]).generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=12,
                                               do_sample=False, sequence_bias={(260,): 6.0})
    want = held[0, len(ids):].tolist()
    got = legacy(server, **body, min_tokens=12).json()
    assert got["choices"][0]["text"] == server.engine.tokenizer.decode(want, skip_special_tokens=True)
    assert got["usage"]["completion_tokens"] == len(want) >= 12


def test_min_p_of_one_leaves_only_the_likeliest_token(server):
    greedy = chat(server, model="modserve:bn", temperature=0).json()["choices"][0]["message"]["content"]
    sampled = chat(server, model="modserve:bn", temperature=1, seed=9, min_p=1.0, n=3).json()["choices"]
    assert all(c["message"]["content"] == greedy for c in sampled)
    assert any(c["message"]["content"] != greedy for c in chat(server, model="modserve:bn", temperature=1.5, seed=9, n=3).json()["choices"])


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(server):
    chunks = sse_chunks(chat(server, stream=True, max_tokens=12, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counted = [chunk["usage"]["completion_tokens"] for chunk in chunks if chunk["choices"] and "usage" in chunk]
    assert counted == sorted(counted) and counted[-1] == chunks[-1]["usage"]["completion_tokens"] and len(counted) >= 2
    assert all("usage" not in chunk for chunk in sse_chunks(chat(server, stream=True, max_tokens=4)))


# --- vLLM's utility endpoints, request ids ----------------------------------------------------


def test_tokenize_and_detokenize_as_vllm_does(server):
    tokenizer = server.engine.tokenizer
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "Swali la hesabu", "return_token_strs": True}).json()
    assert tokens["tokens"] == tokenizer("Swali la hesabu")["input_ids"] and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == server.engine.max_model_len and len(tokens["token_strs"]) == tokens["count"]
    messages = [{"role": "user", "content": "habari"}]
    templated = httpx.post(f"{server.url}/tokenize", json={"model": "modserve:sw", "messages": messages}).json()
    assert templated["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": "Swali la hesabu"}
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(f"{server.url}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_an_incoming_request_id_names_the_request_in_the_response_and_the_log(server, caplog):
    caplog.set_level(logging.INFO, logger="modserve.server")
    response = httpx.post(f"{server.base_url}/chat/completions", headers={"X-Request-Id": "trace-42"},
                          json={"model": "modserve", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert response.headers["x-request-id"] == "trace-42" and response.json()["id"] == "chatcmpl-trace-42"
    assert "chatcmpl-trace-42" in caplog.text
    generated = chat(server)
    assert generated.json()["id"] == f"chatcmpl-{generated.headers['x-request-id']}"
    assert httpx.get(f"{server.url}/health").headers["x-request-id"]
    refused = httpx.post(f"{server.base_url}/chat/completions", headers={"X-Request-Id": "x" * 200}, json={})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "X-Request-Id"


def test_an_unfinished_character_at_the_end_comes_out_as_a_replacement_character(server):
    """Byte 0xE3 starts a 3-byte character; forced as the last token, both backends give
    U+FFFD (the vLLM backend uses this same detokenizer: tests/test_server.py checks it)."""
    body = legacy(server, prompt="x", max_tokens=1, temperature=0, logit_bias={"227": 100}).json()
    assert body["choices"][0]["text"] == "\ufffd"
