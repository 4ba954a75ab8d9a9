"""Every answer other than success: domain exceptions and the handlers that render them, once.

Routes, dependencies and the store raise; nothing else builds an error response. Every error has
one shape, FastAPI's validation shape: ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}``
(``loc`` names the field, header or path parameter at fault; ``type`` is a code a client can
switch on). ``Retry-After`` is built here only. An exception nothing maps is still answered in
that shape, by :class:`DocumentedErrors`.
"""

from __future__ import annotations

import logging
import traceback
from http import HTTPStatus

from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.request.errors import InvalidInput
from service.api.middleware import MAX_TEXT_PART_BYTES
from service.api.uploads import UploadRejected
from service.contract.blobs import StorageUnavailable
from service.contract.pacs import PacsError, PacsUnavailable

log = logging.getLogger("prism.api")


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: list[ErrorDetail]


def retry_after(seconds: int) -> dict[str, str]:
    """The ``Retry-After`` header of 202, 429 and 503 answers."""
    return {"Retry-After": str(max(1, int(seconds)))}


def error_response(
    status_code: int, msg: str, kind: str, loc: list[str | int] | None = None, headers: dict | None = None
) -> JSONResponse:
    body = ErrorBody(detail=[ErrorDetail(loc=loc or [], msg=msg, type=kind)])
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


class ApiError(Exception):
    """An error answer: ``status_code``, a message, a ``kind`` code and where (``loc``)."""

    status_code = 500
    kind = "internal"
    loc: tuple[str | int, ...] = ()
    message = "internal error"

    def __init__(self, message: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = headers or {}


class Unauthorized(ApiError):
    status_code, kind, loc, message = 401, "unauthorized", ("header", "X-API-Key"), "missing or invalid X-API-Key"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "APIKey"})


class JobNotFound(ApiError):
    status_code, kind, loc, message = 404, "not_found", ("path", "job_id"), "no such job"


class BatchNotFound(ApiError):
    status_code, kind, loc, message = 404, "not_found", ("path", "batch_id"), "no such batch"


class BatchTooLarge(ApiError):
    status_code, kind, loc = 413, "too_large", ("body", "manifest")


class FileNotFound(ApiError):
    status_code, kind, loc = 404, "not_found", ("path", "name")


class FilesGone(ApiError):
    status_code, kind, loc = 410, "gone", ("path", "name")
    message = "the job's result files are no longer stored (expired or removed); submit the job again"


class IdempotencyConflict(ApiError):
    status_code, kind, loc = 409, "conflict", ("header", "Idempotency-Key")
    message = "Idempotency-Key was used for a different request"


class UnsupportedMediaType(ApiError):
    status_code, kind, loc = 415, "unsupported_media_type", ("header", "Content-Type")
    message = "the body must be multipart/form-data, with the image as a file part (curl: -F image=@xray.png)"


class NotCancelable(ApiError):
    status_code, kind, message = 409, "conflict", "the job has already finished"


class RetryLater(ApiError):
    """A 429 or 503 the client should repeat after ``seconds``."""

    def __init__(self, seconds: int, message: str | None = None) -> None:
        super().__init__(message, retry_after(seconds))


class RateLimited(RetryLater):
    status_code, kind, message = 429, "rate_limited", "rate limit exceeded"


class QueueFull(RetryLater):
    status_code, kind, message = 503, "queue_full", "queue is full; retry later"


class StorageFull(RetryLater):
    status_code, kind, message = 503, "storage_unavailable", "storage full; nothing was accepted, retry later"


class ManifestErrors(Exception):
    """A batch's manifest has bad rows: one 422 listing each (at most :data:`MAX_LISTED`)."""

    MAX_LISTED = 100

    def __init__(self, errors: list) -> None:
        super().__init__(f"{len(errors)} bad rows")
        self.errors = errors


class NonUtf8Fields(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


def _readable(error: dict) -> str:
    """A validation message as a client reads it: without pydantic's "Value error, " prefix, and a
    text sent where a file belongs said plainly rather than with Python class names."""
    if "Expected UploadFile" in error["msg"]:
        return f"must be a file part (curl: -F {error['loc'][-1]}=@file), not text"
    return error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")


def unreadable_body(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The form parser's 400, said as a client can act on it: a text field over the part limit is
    a 413 naming it; a missing boundary names the Content-Type header; broken framing says where
    the body stopped parsing (:class:`~service.api.middleware.MultipartCheck` watched it)."""
    check = getattr(request.state, "multipart", None)
    if check is not None and check.oversized:
        message = f"is over {MAX_TEXT_PART_BYTES} bytes, a text field's limit (send it as a file part)"
        detail = [ErrorDetail(loc=["body", name], msg=message, type="too_large") for name in check.oversized]
        return JSONResponse(ErrorBody(detail=detail).model_dump(), status_code=413)
    if check is not None and check.problem is not None:
        loc, message = check.problem
        return error_response(400, message, "invalid_multipart", list(loc))
    return error_response(400, f"the body cannot be read as a form ({exc.detail})", "invalid_body", ["body"])


class DocumentedErrors:
    """ASGI, around everything: every error answer in the documented shape.

    * An exception nothing maps is answered 500 ``internal`` with the request id, and logged with
      its traceback but not its message, which may quote input. (Starlette's last handler answers
      and then re-raises, after which uvicorn closes the connection under the client's next
      request; here the exception ends with its answer. One raised once a streamed answer has
      started still ends the connection: that body is incomplete.)
    * An error a library answered itself in plain text (Starlette's file responses refuse a
      malformed ``Range`` header with ``text/plain``) is rewritten in the shape, its status kept.
    """

    def __init__(self, app: ASGIApp, header_name: str) -> None:
        self.app = app
        self.header_name = header_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        plain: Message | None = None
        text = b""

        async def shaping_send(message: Message) -> None:
            nonlocal started, plain, text
            if message["type"] == "http.response.start":
                started = True
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                    plain = message
                    return
            if plain is None:
                await send(message)
                return
            text += message.get("body", b"")
            if not message.get("more_body", False):
                await self._plain_error(scope, receive, send, plain, text.decode("utf-8", "replace"))

        try:
            await self.app(scope, receive, shaping_send)
        except Exception as exc:
            route = getattr(scope.get("route"), "path", "an unrouted path")
            frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
            log.error("unexpected %s in %s %s, answered 500\n%s", type(exc).__name__, scope["method"], route, frames)
            if started:
                raise
            request_id = correlation_id.get() or "-"
            message = f"internal error; quote request id {request_id} when reporting it"
            response = error_response(500, message, "internal", headers={self.header_name: request_id})
            await response(scope, receive, send)

    async def _plain_error(self, scope: Scope, receive: Receive, send: Send, start: Message, text: str) -> None:
        status = start["status"]
        ranged = scope["method"] in ("GET", "HEAD") and status in (400, 416) and b"range" in dict(scope["headers"])
        loc: list[str | int] = ["header", "Range"] if ranged else []
        kept = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in start.get("headers", [])
            if name not in (b"content-type", b"content-length")
        }
        response = error_response(status, text or HTTPStatus(status).phrase, "http_error", loc, kept)
        await response(scope, receive, send)


def install_handlers(app: FastAPI) -> None:
    """Map every domain exception to its answer (``app.state.settings`` gives Retry-After), and
    anything else to the documented 500 (:class:`DocumentedErrors`, added last: outside every
    other middleware, so also around theirs)."""
    from service.api.app import REQUEST_ID  # the app's module, which imports this one, names the header

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 body, minus the echoed input (it may hold prompt text) and pydantic's wording."""
        detail = [ErrorDetail(loc=list(e["loc"]), msg=_readable(e), type=e["type"]) for e in exc.errors()]
        return JSONResponse(ErrorBody(detail=detail).model_dump(), status_code=422)

    @app.exception_handler(NonUtf8Fields)
    async def non_utf8(request: Request, exc: NonUtf8Fields) -> JSONResponse:
        detail = [ErrorDetail(loc=["body", name], msg="must be UTF-8 text", type="encoding") for name in exc.names]
        return JSONResponse(ErrorBody(detail=detail).model_dump(), status_code=422)

    @app.exception_handler(ManifestErrors)
    async def bad_manifest(request: Request, exc: ManifestErrors) -> JSONResponse:
        detail = [
            ErrorDetail(
                loc=["body", "manifest", e.line, e.column], msg=f"line {e.line}: {e.message}", type="value_error"
            )
            for e in exc.errors[: exc.MAX_LISTED]
        ]
        if len(exc.errors) > exc.MAX_LISTED:
            more = f"and {len(exc.errors) - exc.MAX_LISTED} more bad rows"
            detail.append(ErrorDetail(loc=["body", "manifest"], msg=more, type="value_error"))
        return JSONResponse(ErrorBody(detail=detail).model_dump(), status_code=422)

    @app.exception_handler(InvalidInput)
    async def invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(422, exc.message, "value_error", ["body", exc.field])

    @app.exception_handler(UploadRejected)
    async def upload_rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.kind, ["body", exc.field])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.kind, list(exc.loc), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            return unreadable_body(request, exc)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        headers = retry_after(request.app.state.settings.retry_after_s)
        return error_response(503, "queue backend unavailable", "unavailable", headers=headers)

    @app.exception_handler(PacsError)
    async def pacs_refused(request: Request, exc: PacsError) -> JSONResponse:
        kind = "not_found" if exc.status == 404 else "value_error"
        return error_response(exc.status, exc.message, kind, ["body", exc.field])

    @app.exception_handler(PacsUnavailable)
    async def pacs_down(request: Request, exc: PacsUnavailable) -> JSONResponse:
        headers = retry_after(request.app.state.settings.retry_after_s)
        return error_response(503, f"PACS unavailable: {exc}; retry later", "pacs_unavailable", headers=headers)

    @app.exception_handler(StorageUnavailable)
    async def storage_down(request: Request, exc: StorageUnavailable) -> JSONResponse:
        headers = retry_after(request.app.state.settings.retry_after_s)
        message = f"storage unavailable: {exc}; nothing was accepted, retry later"
        return error_response(503, message, "storage_unavailable", headers=headers)

    @app.exception_handler(RedisResponseError)
    async def redis_refused(request: Request, exc: RedisResponseError) -> JSONResponse:
        """Redis at its ``maxmemory`` with ``noeviction`` refuses writes (OOM): the client may retry;
        any other refusal is this service's fault."""
        if isinstance(exc, RedisOutOfMemoryError):  # redis-py drops the reply's "OOM" prefix from the message
            headers = retry_after(request.app.state.settings.retry_after_s)
            message = "storage full: the queue's Redis is at its memory limit; nothing was accepted, retry later"
            return error_response(503, message, "storage_unavailable", headers=headers)
        return error_response(500, "internal error", "internal")

    app.add_middleware(DocumentedErrors, header_name=REQUEST_ID)
