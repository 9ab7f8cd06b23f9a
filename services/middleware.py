"""Pure ASGI middleware that runs before FastAPI reads or parses a request body.

Order matters: :class:`TokenFirst` (outermost) answers 401/403 before :class:`BodyLimit` reads a byte of the
body, so an anonymous client learns nothing about body limits or validation; :class:`BodyLimit` then answers
413 before FastAPI parses anything.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse

from services.security import token_matches

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class TokenFirst:
    """ASGI middleware: every request that may change state needs ``Authorization: Bearer <token>``.

    Args:
        app: The wrapped ASGI app.
        token: Returns the service's API token (it is loaded in the lifespan, after the app is built).
    """

    def __init__(self, app, token: Callable[[], str | None]) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            response = JSONResponse({"detail": "missing bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        expected = self.token()
        if expected is None:  # the lifespan has not loaded it yet
            return await JSONResponse({"detail": "service starting"}, status_code=503)(scope, receive, send)
        if not token_matches(credentials.strip(), expected):
            return await JSONResponse({"detail": "invalid token"}, status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await too_large(scope, receive, send)
        # Read the whole (bounded) body first, then replay it: a chunked body can lie about nothing.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
