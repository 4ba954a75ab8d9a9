"""A raw ASGI middleware that caps request bodies (Starlette and FastAPI have no limit).

Bytes are counted as they arrive, so chunked uploads without Content-Length are capped too;
a declared Content-Length above the limit is refused before reading anything.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


def _body(limit: int) -> bytes:
    detail = [{"loc": ["body"], "msg": f"request body exceeds {limit} bytes", "type": "too_large"}]
    return json.dumps({"detail": detail}).encode()


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        body = _body(self.max_bytes)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
        received = 0
        started = too_large = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
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
                    await self._reject(send)
                    return
            if not too_large:
                await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)
