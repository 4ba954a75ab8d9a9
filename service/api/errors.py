"""Every answer other than success: domain exceptions and the handlers that render them, once.

Routes and the store raise; nothing else builds an error response. Field errors (422 and the
upload's 413/415) share FastAPI's ``{"detail": [{"loc", "msg", "type"}]}`` shape; the others
are ``{"detail": "message"}``. ``Retry-After`` is built here only.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.errors import InvalidInput
from service.api.uploads import UploadRejected


def retry_after(seconds: int) -> dict[str, str]:
    """The ``Retry-After`` header of 202, 429 and 503 answers."""
    return {"Retry-After": str(max(1, int(seconds)))}


class ApiError(Exception):
    """An answer ``{"detail": message}`` with ``status_code`` and optional headers."""

    status_code = 500
    detail = "internal error"

    def __init__(self, detail: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or self.detail)
        self.detail = detail or self.detail
        self.headers = headers or {}


class Unauthorized(ApiError):
    status_code = 401
    detail = "missing or invalid X-API-Key"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "APIKey"})


class JobNotFound(ApiError):
    status_code = 404
    detail = "no such job"


class FileNotFound(ApiError):
    status_code = 404


class IdempotencyConflict(ApiError):
    status_code = 409
    detail = "Idempotency-Key was used for a different request"


class NotCancelable(ApiError):
    status_code = 409
    detail = "the job has already finished"


class RetryLater(ApiError):
    """A 429 or 503 the client should repeat after ``seconds``."""

    def __init__(self, seconds: int, detail: str | None = None) -> None:
        super().__init__(detail, retry_after(seconds))


class RateLimited(RetryLater):
    status_code = 429
    detail = "rate limit exceeded"


class QueueFull(RetryLater):
    status_code = 503
    detail = "queue is full; retry later"


def field_error(status_code: int, field: str, message: str, kind: str) -> JSONResponse:
    body = {"detail": [{"loc": ["body", field], "msg": message, "type": kind}]}
    return JSONResponse(body, status_code=status_code)


def install_handlers(app: FastAPI) -> None:
    """Map every domain exception to its answer (``app.state.settings`` gives Retry-After)."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 body, minus the echoed input (it may hold prompt text)."""
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(InvalidInput)
    async def invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
        return field_error(422, exc.field, exc.message, "value_error")

    @app.exception_handler(UploadRejected)
    async def upload_rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        return field_error(exc.status_code, "image", exc.message, exc.kind)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        headers = retry_after(request.app.state.settings.retry_after_s)
        return JSONResponse({"detail": "queue backend unavailable"}, status_code=503, headers=headers)
