"""``/healthz`` and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from services import metrics
from services.deps import ReconcilerDep, StoreDep
from services.models import Health

router = APIRouter(tags=["system"])


@router.get("/healthz", responses={503: {"model": Health, "description": "the job database is unreachable"}})
def healthz(request: Request, store: StoreDep, reconciler: ReconcilerDep) -> Health:
    """Liveness: the database answers; whether Ray's job server answered the last sync."""
    launcher = request.app.state.launcher
    try:
        active, ok = len(store.active()), store.ping()
    except Exception:
        active, ok = 0, False
    health = Health(status="ok" if ok else "degraded", ray_address=getattr(launcher, "address", None),
                    ray_embedded=request.app.state.head is not None, ray_reachable=reconciler.ray_reachable,
                    jobs_active=active)
    if not ok:
        return JSONResponse(health.model_dump(), status_code=503)  # type: ignore[return-value]
    return health


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
def prometheus(store: StoreDep, reconciler: ReconcilerDep) -> Response:
    """Jobs by state, examples/s and target tokens/s of the running jobs, Ray reachability."""
    return Response(metrics.render(store, reconciler), media_type=CONTENT_TYPE_LATEST)
