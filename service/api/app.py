"""The FastAPI application: routers, middleware and exception handlers, put together once."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from redis import Redis

from service.api.auth import KeyRing
from service.api.errors import install_handlers
from service.api.middleware import BodySizeLimit, Utf8FormFields
from service.api.ratelimit import RateLimit
from service.api.routers import counterfactual, health, jobs
from service.contract.settings import Settings, get_settings

DESCRIPTION = """
Language-guided counterfactual chest X-rays (PRISM): post an image with the prompt that
describes it and an edit prompt; poll the job; download the counterfactual, the signed
difference map and the S_CLIP score. **Research use only: outputs are synthetic and not for
diagnosis.**
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="PRISM counterfactual service", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    app.state.keys = KeyRing(Path(settings.api_keys_file) if settings.api_keys_file else None)
    app.state.rate_limit = RateLimit(app.state.redis, settings.redis_url, settings.rate_limit_per_minute)
    app.add_middleware(Utf8FormFields)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    install_handlers(app)
    for router in (counterfactual.router, jobs.router, health.router):
        app.include_router(router)
    return app
