"""Dependencies of the routes: settings, the job store, the caller's tenant, request checks."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from service.api.errors import NonUtf8Fields, RateLimited, Unauthorized
from service.api.store import JobStore
from service.contract.settings import Settings
from service.contract.tenants import ANONYMOUS, tenant_for


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_store(request: Request, settings: SettingsDep) -> JobStore:
    return JobStore(request.app.state.redis, settings)


Store = Annotated[JobStore, Depends(get_store)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key from `prism keys add`")


def get_tenant(request: Request, settings: SettingsDep, api_key: Annotated[str | None, Depends(api_key_header)]) -> str:
    """The tenant owning the request's API key; 401 without a valid key (unless auth is off)."""
    if settings.auth == "off":
        return ANONYMOUS
    tenant = tenant_for(api_key, request.app.state.tenants.tenants())
    if tenant is None:
        raise Unauthorized
    return tenant


Tenant = Annotated[str, Depends(get_tenant)]


def require_utf8_form(request: Request, tenant: Tenant) -> None:
    """422 naming each text field that was not UTF-8 (noted by :class:`~service.api.middleware.Utf8FormFields`)."""
    bad = getattr(request.state, "non_utf8_fields", [])
    if bad:
        raise NonUtf8Fields(bad)


def rate_limit(request: Request, tenant: Tenant) -> None:
    """Count one submission of the caller's key; 429 with Retry-After above the limit."""
    wait = request.app.state.rate_limit.retry_after(tenant)
    if wait is not None:
        raise RateLimited(wait)
