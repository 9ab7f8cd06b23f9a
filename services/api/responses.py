"""Error responses documented in the OpenAPI schema: every status the service can answer is listed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Problem(BaseModel):
    """Every error body: a message, or FastAPI's list of field errors (422)."""

    detail: str | list[dict[str, Any]]


def _doc(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


ANY = {413: _doc("request body over DISTILLERY_MAX_BODY_BYTES")}  # BodyLimit sees every request
AUTH = {401: _doc("no bearer token (checked before the body is read)"),
        403: _doc("wrong bearer token (checked before the body is read)")}
BODY = {400: _doc("the body could not be read"),
        422: _doc("the body is not valid JSON or not a valid job spec; lists every field error")}
NOT_FOUND = {404: _doc("no job with that id")}
