"""Responses held to the official OpenAI OpenAPI schemas (tests/openai_spec/schemas.json, cut
from github.com/openai/openai-openapi; MIT, see its LICENSE)."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator

SPEC = Path(__file__).parent / "openai_spec" / "schemas.json"


def translated(node):
    """OpenAPI's `nullable: true` (still used across the 3.1 document) as JSON Schema says it."""
    if isinstance(node, list):
        return [translated(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: translated(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def with_the_apis_own_nulls(schemas: dict) -> dict:
    """Two places where OpenAI's API sends null and the schema forgot to allow it: a streamed
    completion chunk's finish_reason before the last chunk, and (echo) the first prompt
    token's log-probability, which nothing predicts. Only these are relaxed."""
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    legacy = next(option for option in choice["logprobs"]["anyOf"] if option.get("type") == "object")["properties"]
    for key in ("token_logprobs", "top_logprobs"):
        legacy[key]["items"] = {"anyOf": [legacy[key]["items"], {"type": "null"}]}
    return schemas


@cache
def components() -> dict:
    schemas = translated(json.loads(SPEC.read_text())["components"]["schemas"])
    return {"schemas": with_the_apis_own_nulls(copy.deepcopy(schemas))}


@cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": components()})


def check(name: str, payload: dict) -> None:
    """Raises jsonschema.ValidationError when the payload breaks the spec's schema `name`."""
    validator(name).validate(payload)
