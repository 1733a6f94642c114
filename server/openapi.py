"""The OpenAPI 3.1 document of lckv-serve (`GET /openapi.json`), written out rather than derived from the routes.

The endpoints parse their bodies themselves (app.py: Content-Type check, strict JSON validation), so FastAPI cannot
see the request models; this module describes them from the same pydantic models, plus every status each operation
can answer with.  The numbers that depend on the running server are filled in: the largest `n` and `max_tokens`
(context length and caps), token ids below the vocabulary size, the logprob limit, and the bearer-key requirement.
A schema-driven fuzzer (loadtests/fuzz.py, tests/test_server_hostile.py) can therefore hold the server to it.
"""

from __future__ import annotations

import copy
from typing import Any

from .schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    VersionResponse,
)

REF = "#/components/schemas/{model}"
ERROR_STATUSES = {
    "400": "Invalid request (malformed JSON, wrong types or values, prompt longer than the context)",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "413": "Request body over --max-body-bytes",
    "415": "Content-Type is not JSON (or not UTF-8)",
    "500": "The engine failed on this request, or the engine has stopped",
    "503": "Over --max-queued-requests (retry after the Retry-After header)",
}


def _add(components: dict, model, mode: str) -> dict:
    schema = model.model_json_schema(ref_template=REF, mode=mode)
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _typed_nodes(node: Any, type_: str):
    """Every schema of type `type_` ("integer", "string") inside `node` (through anyOf/oneOf/allOf and array items)."""
    if isinstance(node, dict):
        if node.get("type") == type_:
            yield node
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                yield from _typed_nodes(sub, type_)
        if "items" in node:
            yield from _typed_nodes(node["items"], type_)


def _cap(schema: dict, field: str, maximum: int | None = None, minimum: int | None = None) -> None:
    prop = schema["properties"].get(field)
    if prop is None:
        return
    for node in _typed_nodes(prop, "integer"):
        if maximum is not None:
            node["maximum"] = min(node.get("maximum", maximum), maximum)
        if minimum is not None:
            node["minimum"] = max(node.get("minimum", minimum), minimum)


def _bounded_request(components: dict, model, *, max_n: int, max_tokens: int, vocab_size: int,
                     max_logprobs: int) -> None:
    schema = components[model.__name__]
    _cap(schema, "n", max_n)
    _cap(schema, "best_of", max_n)
    for field in ("max_tokens", "max_completion_tokens"):
        _cap(schema, field, max_tokens)
    for field in ("prompt", "stop_token_ids"):
        _cap(schema, field, vocab_size - 1, 0)
    if max_logprobs >= 0:
        for field in ("logprobs", "top_logprobs"):
            _cap(schema, field, max_logprobs)
    for field in ("prompt", "stop"):  # empty prompts and stop strings are refused
        for node in _typed_nodes(schema["properties"].get(field), "string"):
            node["minLength"] = 1
    bias = schema["properties"].get("logit_bias")
    if bias is not None:  # keys are token ids
        for node in bias.get("anyOf", [bias]):
            if node.get("type") == "object":
                node["propertyNames"] = {"pattern": "^[0-9]+$"}


def _sse_event(chunk_ref: dict) -> dict:
    """One Server-Sent Event of a stream (OpenAPI 3.1: the `schema` of text/event-stream describes each event):
    its data is a chunk, an error object (a failure after the stream started) or the final `[DONE]`."""
    error_ref = {"$ref": REF.format(model=ErrorResponse.__name__)}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [chunk_ref, error_ref]}}]}}}


def _errors(statuses: list[str]) -> dict:
    ref = {"$ref": REF.format(model=ErrorResponse.__name__)}
    return {s: {"description": ERROR_STATUSES[s], "content": {"application/json": {"schema": ref}}}
            for s in statuses}


def build_openapi(fe, *, version: str, api_key: bool) -> dict:
    """The document for the server around `fe` (an EngineFrontend)."""
    comps: dict[str, Any] = {}
    completion_req = _add(comps, CompletionRequest, "validation")
    chat_req = _add(comps, ChatCompletionRequest, "validation")
    caps = dict(max_n=fe.max_n, max_tokens=fe.max_tokens_cap, vocab_size=fe.vocab_size,
                max_logprobs=fe.max_logprobs)
    _bounded_request(comps, CompletionRequest, **caps)
    _bounded_request(comps, ChatCompletionRequest, **caps)
    out = {m.__name__: _add(comps, m, "serialization") for m in
           (CompletionResponse, ChatCompletionResponse, CompletionChunk, ChatCompletionChunk, ModelList, ModelCard,
            HealthResponse, VersionResponse, ErrorResponse)}
    security = [{"bearerAuth": []}] if api_key else []
    v1_errors = ["401"] if api_key else []

    def generate(request_ref: dict, response_ref: dict, chunk_ref: dict, summary: str) -> dict:
        return {
            "summary": summary,
            "security": security,
            "requestBody": {"required": True, "content": {"application/json": {"schema": request_ref}}},
            "responses": {
                "200": {"description": "The completion (JSON), or with stream=true Server-Sent Events ending in "
                                       "'data: [DONE]'",
                        "content": {"application/json": {"schema": response_ref},
                                    "text/event-stream": {"schema": _sse_event(chunk_ref)}}},
                **_errors(["400", *v1_errors, "404", "413", "415", "500", "503"]),
            },
        }

    def json_ok(ref: dict, description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": ref}}}

    paths = {
        "/v1/completions": {"post": generate(completion_req, out["CompletionResponse"], out["CompletionChunk"],
                                               "Text completion")},
        "/v1/chat/completions": {"post": generate(chat_req, out["ChatCompletionResponse"],
                                                  out["ChatCompletionChunk"],
                                                  "Chat completion (the checkpoint's chat template)")},
        "/v1/models": {"get": {"summary": "Served models", "security": security,
                               "responses": {"200": json_ok(out["ModelList"], "The served model names"),
                                             **_errors(v1_errors)}}},
        "/v1/models/{model_id}": {"get": {
            "summary": "One served model", "security": security,
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": json_ok(out["ModelCard"], "The model"), **_errors([*v1_errors, "404"])}}},
        "/health": {"get": {"summary": "200 while the engine runs, 503 once it has stopped", "responses": {
            "200": json_ok(out["HealthResponse"], "The engine runs"), **_errors(["503"])}}},
        "/version": {"get": {"summary": "Versions", "responses": {"200": json_ok(out["VersionResponse"],
                                                                                 "Versions")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "lckv-serve", "version": version,
                 "description": "OpenAI-compatible completions and chat on vLLM with cross-layer KV sharing"},
        "paths": paths,
        "components": {"schemas": comps},
    }
    if api_key:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return copy.deepcopy(doc)
