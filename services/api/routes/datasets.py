"""``/v1/datasets``: what the stores hold — manifests, progress, counts and sizes."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from pipeline.dataset import NAME_RULE
from services import catalog
from services.config import normalize_store
from services.deps import SettingsDep
from services.models import DatasetDetail, DatasetList

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
StoreQuery = Query(None, description="a store served here (default: the service's default store)",
                   max_length=2048)


def _store(settings: SettingsDep, store: str | None) -> str:
    if store is None:
        return settings.default_store
    try:
        uri = normalize_store(store)
    except ValueError:
        uri = None
    if uri not in settings.stores:
        raise HTTPException(422, [{"type": "value_error", "loc": ["query", "store"],
                                   "msg": f"not a store served here; use one of: {', '.join(settings.stores)}"}])
    return uri


@router.get("")
def list_datasets(settings: SettingsDep, store: str | None = StoreQuery) -> DatasetList:
    """Datasets in a store, complete or not."""
    data = catalog.list_datasets(_store(settings, store))
    return DatasetList(data=data, count=len(data))


@router.get("/{name}", responses={404: {"description": "no such dataset"},
                                  422: {"description": "invalid dataset name"}})
def get_dataset(name: str, settings: SettingsDep, store: str | None = StoreQuery) -> DatasetDetail:
    """One dataset: its manifest when complete, its progress while a job writes it, file count and size."""
    if not catalog.valid_name(name):
        raise HTTPException(422, [{"type": "value_error", "loc": ["path", "name"],
                                   "msg": f"invalid dataset name: use {NAME_RULE}"}])
    detail = catalog.get_dataset(_store(settings, store), name)
    if detail is None:
        raise HTTPException(404, f"no dataset {name!r}")
    return detail
