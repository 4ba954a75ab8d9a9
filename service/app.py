"""The FastAPI application: thin routes over :class:`service.jobs.JobStore`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.errors import InvalidInput
from models.params import EditParams, OutputMode
from models.tokenizer import clip_tokenizer
from models.validation import validate_request
from service.auth import ANONYMOUS, KeyRing, tenant_for
from service.form_charset import Utf8FormRoute
from service.jobs import IdempotencyConflict, JobStore, NotCancelable, QueueFull, links
from service.middleware import BodySizeLimit
from service.ratelimit import retry_after
from service.schemas import (
    FILE_NAMES,
    Health,
    JobAccepted,
    JobStatus,
    MessageBody,
    ValidationErrorBody,
)
from service.settings import Settings, get_settings
from service.uploads import UploadRejected, check_image

DESCRIPTION = """
Language-guided counterfactual chest X-rays (PRISM): post an image with the prompt that
describes it and an edit prompt; poll the job; download the counterfactual, the signed
difference map and the S_CLIP score. **Research use only: outputs are synthetic and not for
diagnosis.**
"""
CONTENT_TYPES = {".png": "image/png", ".npy": "application/octet-stream", ".json": "application/json"}
DEFAULTS = EditParams()


def _error(status: int, field: str, message: str, kind: str) -> JSONResponse:
    body = {"detail": [{"loc": ["body", field], "msg": message, "type": kind}]}
    return JSONResponse(body, status_code=status)


def get_store(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> JobStore:
    return JobStore(request.app.state.redis, settings)


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key from `prism keys add`")


def get_tenant(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    api_key: Annotated[str | None, Depends(api_key_header)],
) -> str:
    """The tenant owning the request's API key; 401 without a valid key (unless auth is off)."""
    if settings.auth == "off":
        return ANONYMOUS
    tenant = tenant_for(api_key, request.app.state.keys.entries())
    if tenant is None:
        raise HTTPException(401, "missing or invalid X-API-Key", headers={"WWW-Authenticate": "APIKey"})
    return tenant


Tenant = Annotated[str, Depends(get_tenant)]
Store = Annotated[JobStore, Depends(get_store)]


def require_utf8_form(request: Request, tenant: Tenant) -> None:
    """422 naming each text field that was not UTF-8 (noted by :class:`Utf8FormRoute`)."""
    bad = getattr(request.state, "non_utf8_fields", [])
    if bad:
        detail = [{"loc": ["body", name], "msg": "must be UTF-8 text", "type": "encoding"} for name in bad]
        raise HTTPException(422, detail)


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None or not text.strip():
        return None
    return tuple(w.strip() for w in text.split(",") if w.strip())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="PRISM counterfactual service", version="0.1.0", description=DESCRIPTION)
    app.state.redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    app.state.keys = KeyRing(Path(settings.api_keys_file) if settings.api_keys_file else None)
    app.dependency_overrides[get_settings] = lambda: settings
    app.router.route_class = Utf8FormRoute
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    unavailable = {"model": MessageBody, "description": "Redis unreachable or queue full; retry after Retry-After"}
    unauthorized = {"model": MessageBody, "description": "missing or invalid X-API-Key"}
    not_found = {"model": MessageBody, "description": "no such job (or it belongs to another API key)"}
    retry = {"Retry-After": str(settings.retry_after_s)}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 body, minus the echoed input (it may hold prompt text)."""
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        headers = {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse({"detail": "queue backend unavailable"}, status_code=503, headers=headers)

    @app.post(
        "/counterfactual",
        status_code=202,
        response_model=JobAccepted,
        summary="Submit an image for a counterfactual edit",
        dependencies=[Depends(require_utf8_form)],
        responses={
            401: unauthorized,
            409: {"model": MessageBody, "description": "Idempotency-Key reused with a different request"},
            413: {"model": ValidationErrorBody, "description": "request body or image too large"},
            415: {"model": ValidationErrorBody, "description": "not a PNG or JPEG"},
            422: {"model": ValidationErrorBody, "description": "a field is invalid; `loc` names it"},
            429: {"model": MessageBody, "description": "rate limit of this API key exceeded"},
            503: unavailable,
        },
    )
    def submit(
        response: Response,
        store: Store,
        tenant: Tenant,
        image: Annotated[UploadFile, File(description="chest X-ray, PNG (8/16-bit) or JPEG")],
        original_prompt: Annotated[str, Form(examples=["chest x-ray of a patient with support devices"])],
        edit_prompt: Annotated[str, Form(examples=["chest x-ray of a patient without support devices"])],
        steps: Annotated[int, Form(ge=1, le=200)] = DEFAULTS.steps,
        guidance_scale: Annotated[float, Form(ge=1.0, le=30.0)] = DEFAULTS.guidance_scale,
        cross_replace_steps: Annotated[float, Form(ge=0.0, le=1.0)] = DEFAULTS.cross_replace_steps,
        self_replace_steps: Annotated[
            str, Form(description="comma-separated fractions, swept in one pass; the best S_CLIP wins")
        ] = ",".join(str(v) for v in DEFAULTS.self_replace_steps),
        edit_word_weight: Annotated[float, Form(ge=0.0, le=10.0)] = DEFAULTS.edit_word_weight,
        blend_words: Annotated[
            str | None, Form(description="comma-separated; default: the words that differ between the prompts")
        ] = None,
        reweight_words: Annotated[
            str | None, Form(description="comma-separated; default: the words the edit prompt adds")
        ] = None,
        seed: Annotated[int, Form(ge=0, le=2**31 - 1)] = DEFAULTS.seed,
        output: Annotated[
            OutputMode,
            Form(
                description="residual: the input plus the edit's effect (decoded edit - decoded reconstruction) "
                "where the edit changed the latent, so unedited pixels keep their values; decoded: the decoded "
                "edit, as in the paper"
            ),
        ] = DEFAULTS.output,
        idempotency_key: Annotated[
            str | None,
            Header(max_length=200, description="repeat a POST with the same key to get the same job back"),
        ] = None,
    ):
        wait = retry_after(store.redis, tenant, settings.rate_limit_per_minute)
        if wait is not None:
            return JSONResponse({"detail": "rate limit exceeded"}, status_code=429, headers={"Retry-After": str(wait)})
        data = image.file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            return _error(413, "image", f"file exceeds {settings.max_upload_bytes} bytes", "too_large")
        try:
            check_image(data, settings.max_image_pixels)
        except UploadRejected as exc:
            return _error(exc.status_code, "image", exc.message, "invalid_image")
        try:
            sweep = tuple(float(v) for v in self_replace_steps.split(",") if v.strip())
        except ValueError:
            return _error(422, "self_replace_steps", "expected comma-separated numbers", "value_error")
        params = EditParams(
            steps=steps,
            guidance_scale=guidance_scale,
            cross_replace_steps=cross_replace_steps,
            self_replace_steps=sweep,
            edit_word_weight=edit_word_weight,
            blend_words=_split(blend_words),
            reweight_words=_split(reweight_words),
            seed=seed,
            output=output,
        )
        try:
            validate_request(clip_tokenizer(), original_prompt, edit_prompt, params)
        except InvalidInput as exc:
            return _error(422, exc.field, exc.message, "value_error")
        request = {
            "original_prompt": original_prompt,
            "edit_prompt": edit_prompt,
            **{k: v for k, v in params.to_dict().items() if k != "null_text"},
        }
        try:
            job_id = store.submit(data, request, tenant, idempotency_key)
        except QueueFull:
            return JSONResponse({"detail": "queue is full; retry later"}, status_code=503, headers=retry)
        except IdempotencyConflict:
            return JSONResponse({"detail": "Idempotency-Key was used for a different request"}, status_code=409)
        response.headers["Location"] = f"/jobs/{job_id}"
        response.headers["Retry-After"] = str(settings.retry_after_s)
        return JobAccepted(id=job_id, links=links(job_id))

    @app.get(
        "/jobs/{job_id}",
        response_model=JobStatus,
        summary="Status, progress, scores and result links of a job",
        responses={401: unauthorized, 404: not_found, 503: unavailable},
    )
    def job_status(job_id: str, store: Store, tenant: Tenant):
        status = store.status(job_id, tenant)
        if status is None:
            return JSONResponse({"detail": "no such job"}, status_code=404)
        return status

    @app.post(
        "/jobs/{job_id}/cancel",
        response_model=JobStatus,
        summary="Cancel a job: a queued job is removed, a running one stops within one denoising step",
        responses={
            401: unauthorized,
            404: not_found,
            409: {"model": MessageBody, "description": "the job has already finished"},
            503: unavailable,
        },
    )
    def cancel(job_id: str, store: Store, tenant: Tenant):
        try:
            status = store.cancel(job_id, tenant)
        except NotCancelable:
            return JSONResponse({"detail": "the job has already finished"}, status_code=409)
        if status is None:
            return JSONResponse({"detail": "no such job"}, status_code=404)
        return status

    @app.get(
        "/jobs/{job_id}/files/{name}",
        summary="Download a result file",
        response_class=Response,
        responses={
            200: {
                "description": "the file",
                "content": {"image/png": {}, "application/octet-stream": {}, "application/json": {}},
            },
            401: unauthorized,
            404: {"model": MessageBody, "description": "no such job or file, or not finished"},
            503: unavailable,
        },
    )
    def job_file(job_id: str, name: str, store: Store, tenant: Tenant):
        content = store.file(job_id, name, tenant)
        if content is None:
            return JSONResponse({"detail": f"no file {name!r} for this job; files: {', '.join(FILE_NAMES)}"}, 404)
        media_type = CONTENT_TYPES[name[name.rindex(".") :]]
        return Response(
            content, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )

    @app.get("/healthz", response_model=Health, summary="The API process is alive")
    def healthz():
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        summary="Redis reachable and at least one worker alive",
        responses={503: {"model": Health, "description": "not ready"}},
    )
    def readyz(store: Store):
        try:
            store.redis.ping()
            workers = store.live_workers()
        except (RedisConnectionError, RedisTimeoutError):
            body = Health(status="unavailable", redis=False, workers=0).model_dump()
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        if workers == 0:
            body = Health(status="unavailable", redis=True, workers=0).model_dump()
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        return Health(status="ok", redis=True, workers=workers)

    return app
