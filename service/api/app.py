"""The FastAPI application: routers, middleware and exception handlers, put together once."""

from __future__ import annotations

import re
from pathlib import Path

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry
from redis import Redis

from service.api.docs import TAGS
from service.api.errors import install_handlers
from service.api.metrics import QueueCollector
from service.api.middleware import BodySizeLimit, ContentSecurityPolicy, Utf8FormFields
from service.api.ratelimit import RateLimit
from service.api.routers import batches, counterfactual, health, jobs, page
from service.contract.blobs import BlobStore
from service.contract.settings import Settings, get_settings
from service.contract.tenants import TenantFile

DESCRIPTION = """
Language-guided counterfactual chest X-rays (PRISM): post an image (PNG, JPEG or DICOM) with
the prompt that describes it and an edit prompt, or with its CheXpert findings and the edit to
make; poll the job (or receive webhooks); download the counterfactual, the signed difference map
and the S_CLIP score. Every error has one shape: `{"detail": [{"loc", "msg", "type"}]}`.
**Research use only: outputs are synthetic and not for diagnosis.**
"""
REQUEST_ID = "X-Request-ID"
# a caller's correlation id (HL7 control id, a UUID, ...) is kept if it has this form; others are
# replaced, so what reaches the logs can neither break a line nor carry free text
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPIOffline(
        title="PRISM counterfactual service",
        version="0.1.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        static_url="/static/docs",
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    app.state.blobs = BlobStore.from_settings(settings)
    app.state.tenants = TenantFile(Path(settings.api_keys_file) if settings.api_keys_file else None)
    app.state.rate_limit = RateLimit(app.state.redis, settings.redis_url, settings.rate_limit_per_minute)
    app.state.metrics = CollectorRegistry()
    app.state.metrics.register(QueueCollector(app.state.redis, settings))
    app.add_middleware(Utf8FormFields)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_upload_bytes, overrides={"/batches": settings.batch_max_upload_bytes}
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Idempotency-Key", REQUEST_ID],
            expose_headers=["Location", "Retry-After", REQUEST_ID],
        )
    app.add_middleware(ContentSecurityPolicy)
    app.add_middleware(
        CorrelationIdMiddleware, header_name=REQUEST_ID, validator=lambda value: bool(SAFE_REQUEST_ID.fullmatch(value))
    )
    install_handlers(app)
    for router in (
        counterfactual.router,
        jobs.router,
        batches.router,
        health.router,
        health.observability,
        page.router,
    ):
        app.include_router(router)
    app.mount("/ui", StaticFiles(directory=page.STATIC), name="ui")
    return app
