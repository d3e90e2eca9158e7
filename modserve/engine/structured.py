"""A structured-output constraint as an xgrammar grammar — the engine vLLM uses, so a
constraint one backend accepts the other accepts too. A constraint that does not compile is
the request's fault: refused with a 400 naming the field it came from, before queueing.

JSON is compact (no free whitespace, separators "," and ":"), as vLLM writes it with its
`disable_any_whitespace` (which modserve sets for its vLLM engine): both backends hold a
request to the same grammar, and a model cannot loop on whitespace inside it."""

from __future__ import annotations

import json
import re

import xgrammar as xgr

from modserve.engine.base import InvalidRequestError, StructuredOutput

JSON_OBJECT = '{"type": "object"}'  # OpenAI's JSON mode: any object
SEPARATORS = (",", ":")
XGRAMMAR_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*", re.M)  # "[time] file.cc:123: why"


def grammar_of(constraint: StructuredOutput) -> xgr.Grammar:
    try:
        if constraint.kind in ("json", "json_object"):
            schema = constraint.spec if constraint.kind == "json" else JSON_OBJECT
            return xgr.Grammar.from_json_schema(schema, strict_mode=True, any_whitespace=False, separators=SEPARATORS)
        if constraint.kind == "regex":
            return xgr.Grammar.from_regex(constraint.spec)
        if constraint.kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in json.loads(constraint.spec)))
        return xgr.Grammar.from_ebnf(constraint.spec)
    except (RuntimeError, ValueError, TypeError) as err:
        why = XGRAMMAR_LOCATION.sub("", str(err)).strip()
        raise InvalidRequestError(f"{constraint.param}: cannot be enforced: {why}", param=constraint.param) from None
