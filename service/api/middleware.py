"""Raw ASGI middleware that watches the request body as it streams in, without copying it.

* :class:`BodySizeLimit`: Starlette/FastAPI put no cap on request bodies; bytes are counted as
  they arrive (also for chunked uploads) and the request is answered 413 past the limit.
* :class:`Utf8FormFields`: Starlette decodes a multipart text field that is not valid UTF-8 as
  Latin-1 instead of failing, so a prompt in a legacy encoding would arrive as different,
  valid-looking text; and when a form does not parse, it says neither which field nor what was
  wrong. The multipart stream is parsed once more on the fly (file parts skipped, text parts
  decoded incrementally, nothing kept) by a :class:`MultipartCheck` left in
  ``request.state.multipart``: the names of text fields that are not UTF-8 (for the route's
  dependencies to answer, after authentication), of text fields over Starlette's part limit, and
  what broke the framing (for the answer to the form parser's 400).
"""

from __future__ import annotations

import codecs
import json

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette import formparsers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


def _too_large_body(limit: int) -> bytes:
    detail = [{"loc": ["body"], "msg": f"request body exceeds {limit} bytes", "type": "too_large"}]
    return json.dumps({"detail": detail}).encode()


class BodySizeLimit:
    """``max_bytes`` for every path but those ``overrides`` gives their own limit (``/batches``)."""

    def __init__(self, app: ASGIApp, max_bytes: int, overrides: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_bytes = max_bytes
        self.overrides = overrides or {}

    async def _reject(self, send: Send, max_bytes: int) -> None:
        body = _too_large_body(max_bytes)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.overrides.get(scope["path"], self.default_bytes)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > max_bytes:
                    await self._reject(send, max_bytes)
                    return
        received = 0
        started = too_large = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            # the app may turn BodyTooLarge into its own error response: answer 413 instead
            nonlocal started
            if message["type"] == "http.response.start":
                if started:
                    return
                started = True
                if too_large:
                    await self._reject(send, max_bytes)
                    return
            if not too_large:
                await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, max_bytes)


MAX_TEXT_PART_BYTES = formparsers.MultiPartParser.max_part_size
"""Starlette's limit on a text field of a form (files have none but the body's)."""


class MultipartCheck:
    """Feed a multipart body chunk by chunk: ``bad`` names the text fields that are not UTF-8,
    ``oversized`` those over :data:`MAX_TEXT_PART_BYTES`, and ``problem`` says what makes the
    body unreadable as a form (``loc`` and message), if anything does.

    A body that does not parse stops the check there: what was found before stays.
    """

    def __init__(self, boundary: bytes | None) -> None:
        self.bad: list[str] = []
        self.oversized: list[str] = []
        self.problem: tuple[list[str], str] | None = None
        self._header_name = self._header_value = self._disposition = b""
        self._name = ""
        self._size = 0
        self._decoder: codecs.IncrementalDecoder | None = None
        self._failed = False
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self._parser: MultipartParser | None = None
        if boundary:
            self._parser = MultipartParser(boundary, callbacks)
        else:
            self.problem = (["header", "Content-Type"], "multipart/form-data needs a boundary parameter")

    @classmethod
    def for_content_type(cls, content_type: str) -> MultipartCheck | None:
        kind, options = parse_options_header(content_type)
        return cls(options.get(b"boundary")) if kind == b"multipart/form-data" else None

    def feed(self, chunk: bytes) -> None:
        if self._parser is None:
            return
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            self._parser = None
            self.problem = (["body"], f"the multipart body is malformed ({exc})")

    def _part_begin(self) -> None:
        self._disposition = b""
        self._decoder = None
        self._failed = False
        self._size = 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        options = parse_options_header(self._disposition)[1]
        if b"name" not in options and self.problem is None:
            self.problem = (["body"], "a part of the form has no name (its Content-Disposition needs name=...)")
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        is_file = b"filename" in options
        self._decoder = None if is_file else codecs.getincrementaldecoder("utf-8")()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._decoder is None:
            return
        self._size += end - start
        if self._size > MAX_TEXT_PART_BYTES and self._name not in self.oversized:
            self.oversized.append(self._name)
        if self._failed:
            return
        try:
            self._decoder.decode(data[start:end])
        except UnicodeDecodeError:
            self._failed = True

    def _part_end(self) -> None:
        if self._decoder is None:
            return
        if not self._failed:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self._failed = True
        if self._failed:
            self.bad.append(self._name)


class Utf8FormFields:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        check = MultipartCheck.for_content_type(headers.get(b"content-type", b"").decode("latin-1"))
        if check is None:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["multipart"] = check

        async def checking_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                check.feed(message.get("body", b""))
            return message

        await self.app(scope, checking_receive, send)


CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class ContentSecurityPolicy:
    """Every HTML page the service serves may load from its own origin only (the docs pages'
    bundles would otherwise fetch a logo from a CDN): hospitals run without internet."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"text/html"):
                    message["headers"] = [
                        *message["headers"],
                        (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                    ]
            await send(message)

        await self.app(scope, receive, send_with_policy)
