"""Typed FastAPI dependencies: the app's settings, job store and launcher, and the bearer-token check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.config import Settings
from services.launcher import RayLauncher
from services.reconciler import Reconciler
from services.security import token_matches
from services.store import JobStore

_bearer = HTTPBearer(auto_error=False, description="the service's API token (see `distillery serve`)")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_launcher(request: Request) -> RayLauncher:
    return request.app.state.launcher


def get_reconciler(request: Request) -> Reconciler:
    return request.app.state.reconciler


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 without a bearer token, 403 with a wrong one."""
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if not token_matches(credentials.credentials, request.app.state.token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid token")


def is_authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> bool:
    """Whether an optional bearer token is the service's (reads are open; some fields are for its users only)."""
    token = request.app.state.token
    return credentials is not None and token is not None and token_matches(credentials.credentials, token)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
LauncherDep = Annotated[RayLauncher, Depends(get_launcher)]
ReconcilerDep = Annotated[Reconciler, Depends(get_reconciler)]
Authorized = Depends(require_token)
Authenticated = Annotated[bool, Depends(is_authenticated)]
