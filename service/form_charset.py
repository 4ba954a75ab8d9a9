"""Refuse multipart text fields that are not UTF-8.

Starlette decodes a form field that is not valid UTF-8 as Latin-1 instead of failing, so a prompt
sent in a legacy encoding would arrive as different, valid-looking text. The route class below
reads the raw body first (Starlette keeps it for the form parser) and records the offending
field names in ``request.state.non_utf8_fields``; the route's dependencies decide the answer
(after authentication). File parts are skipped without being copied.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import Response


class _Part:
    def __init__(self) -> None:
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.name = b""
        self.data = bytearray()
        self.is_file = False


def non_utf8_fields(body: bytes, content_type: str) -> list[str]:
    """Names of the text fields (parts without a filename) of a multipart body that are not UTF-8.

    A body that does not parse yields no names: the form parser reports it.
    """
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return []
    bad: list[str] = []
    part = _Part()

    def on_part_begin() -> None:
        nonlocal part
        part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.header_value += data[start:end]

    def on_header_end() -> None:
        if part.header_name.lower() == b"content-disposition":
            part.disposition = part.header_value
        part.header_name = part.header_value = b""

    def on_headers_finished() -> None:
        options = parse_options_header(part.disposition)[1]
        part.name = options.get(b"name", b"")
        part.is_file = b"filename" in options

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if not part.is_file:
            part.data += data[start:end]

    def on_part_end() -> None:
        if part.is_file:
            return
        try:
            part.data.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(part.name.decode("utf-8", "replace"))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        MultipartParser(boundary, callbacks).write(body)
    except MultipartParseError:
        return []
    return bad


class Utf8FormRoute(APIRoute):
    """An APIRoute that notes the multipart text fields that are not UTF-8 before parsing."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            bad = non_utf8_fields(await request.body(), content_type) if content_type.startswith("multipart/") else []
            request.state.non_utf8_fields = bad
            return await handler(request)

        return route
