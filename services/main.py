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
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pipeline.storage import UMASK_ENV
from services.api import responses
from services.api.routes import datasets, jobs, system
from services.config import Settings
from services.launcher import EmbeddedHead, RayLauncher
from services.middleware import BodyLimit, TokenFirst
from services.models import IllegalTransition
from services.reconciler import Reconciler
from services.security import load_or_create_token, secure_state_dir
from services.store import JobNotFound, JobStore

log = logging.getLogger("distillery.services")


def json_safe(value):
    """``value`` with every non-finite float spelled as a string: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


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
        secure_state_dir(settings)
        app.state.token = load_or_create_token(settings)
        app.state.store = store = JobStore(settings.db_url)
        app.state.head = head = None
        ray = launcher
        job_env = {UMASK_ENV: settings.dataset_umask}
        if ray is None and settings.ray_address:
            token = settings.ray_token.get_secret_value() if settings.ray_token else None
            ray = RayLauncher(settings.ray_address, token=token, python=settings.python, env=job_env)
        elif ray is None:
            app.state.head = head = EmbeddedHead(settings.state_path, num_cpus=settings.ray_num_cpus)
            address = await asyncio.to_thread(head.start)
            log.info("%s embedded Ray head at %s (pid %s)", "re-attached to the" if head.adopted else "started an",
                     address, head.pid)
            ray = RayLauncher(address, token=head.token, python=settings.python, env=job_env)
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
                              "and browse the datasets they write. POST endpoints need `Authorization: Bearer`.",
                  responses=responses.ANY)
    app.state.settings = settings
    app.state.token = None
    # Added last = runs first: the token is checked before the body is read, the size before it is parsed.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(TokenFirst, token=lambda: app.state.token)
    app.include_router(jobs.router)
    app.include_router(datasets.router)
    app.include_router(system.router)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The errors echo the input, which may hold NaN or Infinity (Python's json reads them): spell them out.
        return JSONResponse({"detail": json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"no job {exc.args[0]!r}"}, status_code=404)

    @app.exception_handler(IllegalTransition)
    async def _conflict(request: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    return app


def bind(host: str, port: int) -> socket.socket:
    """The service's listening socket, bound before anything else starts (an embedded Ray head picks free
    ports for itself and could otherwise take this one).

    Raises:
        ValueError: The address is in use or cannot be bound, with a clear message.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}; is another service running there? "
                         "(choose another --port)") from None
    sock.set_inheritable(True)
    return sock


def serve_on(settings: Settings, sock: socket.socket) -> None:
    """Start the app (and its Ray head) and serve on the bound ``sock`` (see :func:`bind`) until stopped."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="info"))
    with contextlib.closing(sock):
        server.run(sockets=[sock])
