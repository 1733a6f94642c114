"""The FastAPI application of lckv-serve: routes, API-key check, body-size limit, request metrics, OpenAPI document.

`create_app(frontend)` takes an `EngineFrontend`, so the same app runs on a real `AsyncLLM` (cli.py) or on a stand-in
engine in tests.  The middlewares are plain ASGI (not `BaseHTTPMiddleware`), which would buffer streamed responses
and hide the client's disconnect from the endpoints.

Request bodies: `Content-Type` must be JSON (`application/json` or `application/*+json`, charset UTF-8) or absent,
else 415; the body is parsed and validated in one step by pydantic's JSON parser (strict types, nesting limited,
unpaired UTF-16 surrogate escapes and invalid UTF-8 refused), so any malformed body is a 400 in OpenAI's shape.
`/openapi.json` describes exactly what is accepted (with this server's context length, vocabulary and caps).
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
import json
import logging
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from . import __version__
from .chat import create_chat_completion
from .completions import create_completion
from .engine import EngineFrontend
from .errors import APIError, BodyTooLarge, error_body, from_engine_exception, install_handlers, log_unexpected
from .metrics import ServerMetrics
from .openapi import build_openapi
from .schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .sse import ClientGone

logger = logging.getLogger("lckv_vllm.server")

DEFAULT_MAX_BODY_BYTES = 4 << 20


async def _send_error(send, status: int, message: str, code: str | None = None, headers=()) -> None:
    body = json.dumps(error_body(status, message, code=code), separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardMiddleware:
    """Request metrics, the body-size limit (413) and the API key (401), in that order, as one ASGI layer."""

    def __init__(self, app, *, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key
        # The key is compared as SHA-256 digests: `compare_digest` on equal-length inputs takes the same time
        # wherever they differ, and hashing first hides the key's length too.
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key is not None else None
        self.max_body_bytes = max_body_bytes

    def key_matches(self, token: bytes) -> bool:
        return hmac.compare_digest(hashlib.sha256(token).digest(), self._key_digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        path = scope.get("path", "")
        state = {"status": None, "complete": False}

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        try:
            await self._guarded(scope, receive, tracked_send, path)
        except Exception as exc:  # noqa: BLE001
            # A bug somewhere below.  The app's catch-all handler has answered (500 in OpenAI's shape) when it
            # could, and Starlette re-raises for the server to log; we log here instead, without the exception's
            # message (it may quote the request body), so uvicorn's full-traceback log never sees it.
            log_unexpected(exc, scope.get("method", "?"), path)
            if state["status"] is None:
                err = from_engine_exception(exc)
                await _send_error(tracked_send, err.status, err.message, code=err.code)
        finally:
            # 499 (nginx's "client closed request"): the response was cut short because the client went away.
            status = state["status"] if state["complete"] else 499
            self.metrics.observe_request(path, status or 499, time.monotonic() - t0)

    async def _guarded(self, scope, receive, send, path: str):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limit = self.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(send, 413, f"the request body has {int(length)} bytes; the limit is {limit}",
                                     code="request_too_large")
        if self.api_key is not None and path.startswith("/v1"):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if not auth:
                return await _send_error(send, 401, "missing API key: send 'Authorization: Bearer <key>'",
                                         code="missing_api_key", headers=[(b"www-authenticate", b"Bearer")])
            if scheme.lower() != "bearer" or not self.key_matches(token.strip().encode("latin-1")):
                return await _send_error(send, 401, "invalid API key", code="invalid_api_key",
                                         headers=[(b"www-authenticate", b"Bearer")])

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # answered as 413 by the APIError handler
            return message

        await self.app(scope, limited_receive, send)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def check_content_type(value: str | None) -> None:
    """415 unless the body is declared as JSON in UTF-8; no Content-Type at all is taken as JSON."""
    if value is None or not value.strip():
        return
    media, _, params = value.partition(";")
    media = media.strip().lower()
    shown = media[:80]
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        raise APIError(415, f"unsupported Content-Type '{shown}': send the body as JSON with "
                            f"'Content-Type: application/json'", code="unsupported_media_type")
    for param in params.split(";"):
        key, _, val = param.partition("=")
        charset = val.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise APIError(415, f"unsupported charset '{charset[:40]}': JSON bodies must be UTF-8",
                           code="unsupported_media_type")


def _json_error(body: bytes, detail: str) -> APIError:
    if "recursion limit" in detail:
        msg = "the request body's JSON nests arrays/objects too deeply"
    elif "surrogate" in detail or ("hex escape" in detail and _SURROGATE_ESCAPE.search(body)):
        msg = "the request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); strings must be " \
              "valid Unicode"
    elif "unicode code point" in detail:
        msg = "the request body is not valid UTF-8"
    else:
        msg = "the request body is not valid JSON"
    return APIError(400, f"{msg} ({detail})", code="invalid_json")


async def _parse(raw: Request, model):
    """The body as `model`: Content-Type checked (415), then parsed and validated in one step (400)."""
    check_content_type(raw.headers.get("content-type"))
    try:
        body = await raw.body()
    except ClientDisconnect:  # the client went away half-way through sending its body
        raise ClientGone() from None
    if body.startswith(codecs.BOM_UTF8):  # allowed to be ignored (RFC 8259 section 8.1); some Windows tools send it
        body = body[len(codecs.BOM_UTF8):]
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            raise _json_error(body, str(first.get("ctx", {}).get("error", "parse error"))) from None
        if first.get("type") == "model_type" and not first.get("loc"):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json") from None
        raise RequestValidationError(errors) from None


def create_app(fe: EngineFrontend, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or ServerMetrics()
    # FastAPI's own document cannot see the request models (the endpoints parse their bodies themselves), and no
    # docs UI is served; /openapi.json below is written out by openapi.py.
    app = FastAPI(title="lckv-serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.frontend = fe
    app.state.metrics = metrics
    install_handlers(app)
    openapi_doc: dict = {}

    @app.get("/openapi.json")
    async def openapi():
        if not openapi_doc:
            openapi_doc.update(build_openapi(fe, version=__version__, api_key=api_key is not None))
        return JSONResponse(openapi_doc)

    @app.get("/health")
    async def health():
        if not fe.healthy:
            return JSONResponse(error_body(503, "the engine has stopped", code="engine_dead"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version():
        import vllm

        return {"version": __version__, "lckv_vllm": __version__, "vllm": getattr(vllm, "__version__", "unknown")}

    @app.get("/metrics")
    async def prometheus():
        # the scheduler's view as of this request: read before awaiting the engine for the prefill telemetry
        import copy

        now = (copy.copy(fe.stats), fe.num_unfinished(), fe.admitted, fe.healthy)
        prefill = await fe.refresh_prefill_stats()
        body = metrics.render(fe.kv, *now, prefill)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def _card(name: str) -> ModelCard:
        lora = fe.lora_for(name)
        return ModelCard(id=name, created=fe.created, root=lora.lora_path if lora else fe.model_path,
                         parent=fe.model_name if lora else None, max_model_len=fe.max_model_len,
                         layer_types=fe.kv.layer_types, checkpoint_layer_types=fe.kv.checkpoint_layer_types,
                         kv_bytes_per_token=fe.kv.bytes_per_token)

    @app.get("/v1/models")
    async def models():
        cards = [_card(name) for name in fe.model_names]
        return ModelList(data=cards).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        name = fe.resolve_model(model_id)
        return _card(name).model_dump()

    async def generate(raw: Request, request_model, create) -> Response:
        """Parse the body as `request_model` and answer it with `create`; 499 if the client went away first."""
        try:
            body = await _parse(raw, request_model)
            return await create(fe, metrics, body, raw)
        except ClientGone:
            return Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await generate(raw, CompletionRequest, create_completion)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        return await generate(raw, ChatCompletionRequest, create_chat_completion)

    return GuardMiddleware(app, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes)


__all__ = ["create_app", "APIError"]
