"""Dependencies of the routes: settings, the job store, the caller's tenant, request checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader
from python_multipart.multipart import parse_options_header

from models.request.errors import InvalidInput
from service.api.errors import NonUtf8Fields, RateLimited, Unauthorized, UnsupportedMediaType
from service.api.forms import REPEATABLE
from service.api.ratelimit import RateLimit
from service.api.store import JobStore
from service.contract.settings import Settings
from service.contract.tenants import ANONYMOUS, tenant_for


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_store(request: Request, settings: SettingsDep) -> JobStore:
    return JobStore(request.app.state.redis, settings, request.app.state.blobs)


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


def require_multipart(request: Request, tenant: Tenant) -> None:
    """415 for a body that is not a multipart form (JSON, urlencoded): the image is a file part."""
    if parse_options_header(request.headers.get("content-type", ""))[0] != b"multipart/form-data":
        raise UnsupportedMediaType


async def one_part_per_field(request: Request, tenant: Tenant) -> None:
    """422 for a field sent twice (two ``image`` parts, say), but for the list fields: the form
    would silently keep one of its values."""
    form = await request.form()  # parsed once already, for the route's own fields
    for name in dict.fromkeys(form.keys()):
        if name not in REPEATABLE and len(form.getlist(name)) > 1:
            raise InvalidInput(name, "is given more than once; send one")


def require_utf8_form(request: Request, tenant: Tenant) -> None:
    """422 naming each text field that was not UTF-8 (noted by :class:`~service.api.middleware.Utf8FormFields`)."""
    check = getattr(request.state, "multipart", None)
    if check is not None and check.bad:
        raise NonUtf8Fields(check.bad)


@dataclass(frozen=True)
class Admission:
    """The caller's rate limit, checked when the request arrives and counted by :meth:`admit` once
    the request has passed its checks, so refused requests do not count."""

    limit: RateLimit
    tenant: str

    def admit(self) -> None:
        wait = self.limit.hit(self.tenant)
        if wait is not None:
            raise RateLimited(wait)


def rate_limit(request: Request, tenant: Tenant) -> Admission:
    """429 with Retry-After while the caller's key is at its limit."""
    limit: RateLimit = request.app.state.rate_limit
    wait = limit.wait(tenant)
    if wait is not None:
        raise RateLimited(wait)
    return Admission(limit, tenant)


Admitted = Annotated[Admission, Depends(rate_limit)]
