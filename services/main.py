"""The job service: ``create_app(settings)`` builds the FastAPI app.

Its lifespan opens the job store, loads (or generates) the API token, connects to Ray — starting an
embedded head when no address is configured — and runs the reconciler every ``reconcile_interval_s``;
on shutdown it stops the reconciler and the embedded head (jobs on an external cluster keep running and
are re-attached at the next start).

Run it with ``distillery serve`` or ``uvicorn --factory services.main:create_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.api.routes import datasets, jobs, system
from services.config import Settings
from services.launcher import EmbeddedHead, RayLauncher
from services.models import IllegalTransition
from services.reconciler import Reconciler
from services.security import load_or_create_token
from services.store import JobNotFound, JobStore

log = logging.getLogger("distillery.services")


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


async def _reconcile_forever(reconciler: Reconciler, interval: float) -> None:
    while True:
        try:
            await asyncio.to_thread(reconciler.sync)
        except Exception:
            log.exception("reconciler pass failed")
        await asyncio.sleep(interval)


def create_app(settings: Settings | None = None, *, launcher: RayLauncher | None = None) -> FastAPI:
    """Build the app.

    Args:
        settings: Configuration (default: from ``DISTILLERY_*`` environment variables).
        launcher: Ray launcher to use instead of connecting to ``settings.ray_address`` or an embedded head
            (tests pass a stand-in).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.state_path.mkdir(parents=True, exist_ok=True)
        app.state.token = load_or_create_token(settings)
        app.state.store = store = JobStore(settings.db_url)
        app.state.head = head = None
        ray = launcher
        if ray is None and settings.ray_address:
            token = settings.ray_token.get_secret_value() if settings.ray_token else None
            ray = RayLauncher(settings.ray_address, token=token, python=settings.python)
        elif ray is None:
            app.state.head = head = EmbeddedHead(settings.state_path, num_cpus=settings.ray_num_cpus)
            address = await asyncio.to_thread(head.start)
            log.info("embedded Ray head at %s", address)
            ray = RayLauncher(address, token=head.token, python=settings.python)
        app.state.launcher = ray
        app.state.reconciler = reconciler = Reconciler(store, ray, settings)
        await asyncio.to_thread(reconciler.sync)  # re-attach before the first request
        task = asyncio.create_task(_reconcile_forever(reconciler, settings.reconcile_interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if head is not None:
                await asyncio.to_thread(head.stop)
            store.close()

    app = FastAPI(title="distillery job service", version="1", lifespan=lifespan,
                  description="Submit distillation jobs (the pipeline's job spec), follow them, cancel them, "
                              "and browse the datasets they write. POST endpoints need `Authorization: Bearer`.")
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.include_router(jobs.router)
    app.include_router(datasets.router)
    app.include_router(system.router)

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"no job {exc.args[0]!r}"}, status_code=404)

    @app.exception_handler(IllegalTransition)
    async def _conflict(request: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    return app
