"""Errors in OpenAI's shape, and the one place that maps every failure to an HTTP status.

Every non-2xx answer of the server is `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients raise
their typed exceptions (`BadRequestError`, `AuthenticationError`, `NotFoundError`, ...) with our message.  Handlers
raise `APIError`; FastAPI's own failures (malformed JSON, schema violations, unknown routes) and the engine's
exceptions are converted here, so no handler has to remember the shape.
"""

from __future__ import annotations

import json
import logging
import traceback
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("lckv_vllm.server")

# OpenAI's error "type" for each status we answer with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client as-is (status, message, param, code)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class BodyTooLarge(APIError):
    """Raised from the ASGI receive channel when a body without Content-Length grows past the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _printable(text: str | None, limit: int = 2000) -> str | None:
    """Clip a message, and make it encodable: one that quotes the request must never fail to encode as UTF-8."""
    if text is None:
        return None
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    message, param = _printable(message), _printable(param, 200)
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500
                                                                  else "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)


def sse_error(err: APIError) -> str:
    """An error that happens after a stream has started (the status line is already sent): one SSE event."""
    return f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"


def from_engine_exception(e: BaseException) -> APIError:
    """Map what `AsyncLLM.generate` can raise to an APIError.

    vLLM splits its errors into client errors (VLLMClientError: the request is invalid), graceful HTTP errors that
    carry their own status (admission control: 503) and server errors (EngineGenerateError: this request failed,
    the engine lives on; EngineDeadError: the engine is gone).  Anything else is a bug here or in the engine: 500.
    """
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMNotFoundError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    if isinstance(e, APIError):
        return e
    if isinstance(e, GracefulHTTPError):
        status = int(e.http_status)
        return APIError(status, e.message, code="queue_full" if status == 503 else None,
                        headers={"Retry-After": "1"} if status in (429, 503) else None)
    if isinstance(e, VLLMNotFoundError):
        return APIError(404, str(e))
    if isinstance(e, VLLMClientError):
        return APIError(400, str(e), param=getattr(e, "parameter", None))
    if isinstance(e, EngineDeadError):
        return APIError(500, "the inference engine has stopped; this server cannot serve requests any more",
                        code="engine_dead")
    if isinstance(e, EngineGenerateError):
        cause = e.__cause__
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        return APIError(500, f"the inference engine failed on this request{detail}", code="engine_error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


def log_unexpected(exc: BaseException, method: str, path: str) -> None:
    """Log a bug's type and stack, but not its message: messages of exceptions raised while handling a request
    (KeyError('...'), UnicodeEncodeError, pydantic's) may quote the request body, and the log must not."""
    chain, seen, e = [], set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(type(e).__qualname__)
        e = e.__cause__ or e.__context__
    stack = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
    logger.error("unhandled %s on %s %s (exception messages withheld from the log; the client got them in its "
                 "500)\nTraceback (most recent call last):\n%s", " <- ".join(chain), method, path, stack.rstrip())


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # pydantic adds the union member's type name to a location ("prompt.str"); keep the field path only.
    parts = [p for p in parts if not (p in ("str", "int", "list[str]", "list[int]", "list[list[int]]")
                                      or p.startswith(("list[", "function-", "lax-", "json-")))]
    return ".".join(parts) or None


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}"
            return error_response(bad_request(msg, code="invalid_json"))
        # Group by field: a union (the prompt's four forms) fails once per member, and one line per field reads
        # better than four near-identical ones.
        grouped: dict[str, list[str]] = {}
        for err in errors:
            where = _loc_to_param(tuple(err.get("loc", ()))) or "body"
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if msg not in grouped.setdefault(where, []):
                grouped[where].append(msg)
        parts = [f"{where}: {' or '.join(msgs)}" for where, msgs in list(grouped.items())[:5]]
        more = f" (and {len(grouped) - 5} more fields)" if len(grouped) > 5 else ""
        param = _loc_to_param(tuple(first.get("loc", ()))) if first else None
        return error_response(bad_request("invalid request: " + "; ".join(parts) + more, param=param,
                                          code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, " \
                  f"POST /v1/chat/completions"
            return error_response(APIError(404, msg, code="unknown_route"))
        phrase = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else ""
        detail = exc.detail if isinstance(exc.detail, str) else phrase
        return error_response(APIError(exc.status_code, f"{detail} ({request.method} {request.url.path})",
                                       headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # Starlette re-raises the exception after this answer; app.GuardMiddleware logs it (without its message).
        return error_response(from_engine_exception(exc))
