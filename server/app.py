"""The FastAPI application of lckv-serve: routes, API-key check, body-size limit and request metrics.

`create_app(frontend)` takes an `EngineFrontend`, so the same app runs on a real `AsyncLLM` (cli.py) or on a stand-in
engine in tests.  The middlewares are plain ASGI (not `BaseHTTPMiddleware`), which would buffer streamed responses
and hide the client's disconnect from the endpoints.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import JSONResponse, Response

from . import __version__
from .engine import EngineFrontend
from .errors import APIError, BodyTooLarge, error_body, install_handlers
from .metrics import ServerMetrics
from .schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .serving import ClientGone, create_chat_completion, create_completion

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
        self.max_body_bytes = max_body_bytes

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
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
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


async def _parse(raw: Request, model):
    """The JSON body as `model`, whatever the Content-Type says (curl -d sends form-urlencoded by default)."""
    body = await raw.body()
    try:
        data = json.loads(body)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def create_app(fe: EngineFrontend, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or ServerMetrics()
    app = FastAPI(title="lckv-serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.frontend = fe
    app.state.metrics = metrics
    install_handlers(app)

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
        body = metrics.render(fe.kv, fe.stats, fe.num_unfinished(), fe.admitted, fe.healthy)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        cards = [ModelCard(id=name, created=fe.created, root=fe.model_path, max_model_len=fe.max_model_len)
                 for name in fe.served_model_names]
        return ModelList(data=cards).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        name = fe.resolve_model(model_id)
        return ModelCard(id=name, created=fe.created, root=fe.model_path, max_model_len=fe.max_model_len).model_dump()

    @app.post("/v1/completions")
    async def completions(raw: Request):
        body = await _parse(raw, CompletionRequest)
        try:
            return await create_completion(fe, metrics, body, raw)
        except ClientGone:
            return Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        body = await _parse(raw, ChatCompletionRequest)
        try:
            return await create_chat_completion(fe, metrics, body, raw)
        except ClientGone:
            return Response(status_code=499)

    return GuardMiddleware(app, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes)


__all__ = ["create_app", "APIError"]
