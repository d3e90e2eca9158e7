"""Regenerate schemas.json: the schemas modserve's responses are held to, and everything they
reference, cut from the official OpenAI OpenAPI spec (github.com/openai/openai-openapi, MIT).

    python tests/openai_spec/extract.py path/to/openapi.json COMMIT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOTS = [
    "CreateChatCompletionRequest", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
    "CreateCompletionRequest", "CreateCompletionResponse", "ListModelsResponse", "Model", "ErrorResponse",
]


def referenced(node, schemas: dict, found: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and value.startswith("#/components/schemas/"):
                name = value.rsplit("/", 1)[1]
                if name not in found:
                    found.add(name)
                    referenced(schemas[name], schemas, found)
            else:
                referenced(value, schemas, found)
    elif isinstance(node, list):
        for item in node:
            referenced(item, schemas, found)


def main(spec_path: str, commit: str) -> None:
    schemas = json.loads(Path(spec_path).read_text())["components"]["schemas"]
    found = set(ROOTS)
    for root in ROOTS:
        referenced(schemas[root], schemas, found)
    out = {
        "source": "https://github.com/openai/openai-openapi (openapi.json), MIT licence: see LICENSE",
        "commit": commit,
        "components": {"schemas": {name: schemas[name] for name in sorted(found)}},
    }
    (Path(__file__).parent / "schemas.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
