"""Reading datasets from the stores: manifests, progress files, sizes. Never shard contents.

Only names matching :data:`pipeline.spec.NAME_PATTERN` are ever joined to a store root, and
:class:`pipeline.storage.Store` refuses any path that would leave the root, so nothing a client sends
reads outside a store.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pyarrow.fs as pafs

from pipeline.spec import NAME_PATTERN
from pipeline.storage import StorageError, Store
from services.models import DatasetDetail, DatasetSummary, JobProgress

MANIFEST, PROGRESS, JOB = "_manifest.json", "_progress.json", "_job.json"
MAX_META_BYTES = 16 << 20  # a manifest lists every shard; 16 MiB is ~100k shards


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name)) and name not in (".", "..")


@lru_cache(maxsize=64)
def open_store(uri: str, endpoint: str | None = None) -> Store:
    return Store.from_uri(uri, endpoint_override=endpoint)


def _read_json(store: Store, path: str) -> dict[str, Any] | None:
    """A small JSON file, or None when it is missing, too large, or not a JSON object."""
    try:
        info = store.filesystem.get_file_info(store.join(path))
        if info.type != pafs.FileType.File or info.size > MAX_META_BYTES:
            return None
        data = store.read_json(path)
    except (OSError, ValueError):  # ValueError covers JSON errors and StorageError
        return None
    return data if isinstance(data, dict) else None


def read_progress(store: Store, name: str) -> JobProgress | None:
    data = _read_json(store, f"{name}/{PROGRESS}")
    try:
        return JobProgress.from_file(data) if data else None
    except ValueError:
        return None


def _summary(store: Store, store_uri: str, name: str) -> tuple[DatasetSummary, dict | None, dict | None]:
    manifest = _read_json(store, f"{name}/{MANIFEST}")
    progress = _read_json(store, f"{name}/{PROGRESS}")
    summary = DatasetSummary(name=name, store=store_uri, complete=manifest is not None,
                             state=(progress or {}).get("state") if progress else None)
    if manifest is not None:
        counts = manifest.get("counts") or {}
        summary.examples, summary.rows = counts.get("examples"), counts.get("rows")
        summary.target_tokens, summary.bytes = counts.get("target_tokens"), counts.get("bytes")
        summary.shards, summary.dataset_hash = len(manifest.get("shards") or []), manifest.get("dataset_hash")
    elif progress is not None:
        summary.examples, summary.rows = progress.get("examples_done"), progress.get("rows_done")
        summary.target_tokens, summary.bytes = progress.get("target_tokens_done"), progress.get("bytes_written")
        summary.shards = progress.get("shards_done")
    return summary, manifest, progress


def list_datasets(store_uri: str) -> list[DatasetSummary]:
    """Dataset directories directly under the store root (those holding a job, progress or manifest file)."""
    store = open_store(store_uri)
    selector = pafs.FileSelector(store.root, recursive=False, allow_not_found=True)
    names = sorted(info.base_name for info in store.filesystem.get_file_info(selector)
                   if info.type == pafs.FileType.Directory and valid_name(info.base_name))
    out = []
    for name in names:
        if any(store.exists(f"{name}/{f}") for f in (MANIFEST, PROGRESS, JOB)):
            out.append(_summary(store, store_uri, name)[0])
    return out


def get_dataset(store_uri: str, name: str) -> DatasetDetail | None:
    """One dataset with its manifest and progress, or None if there is none of that name."""
    if not valid_name(name):
        return None
    store = open_store(store_uri)
    try:
        if not store.exists(name):
            return None
        files = store.list(name)
    except (OSError, StorageError):
        return None
    summary, manifest, progress = _summary(store, store_uri, name)
    if manifest is None and progress is None and not any(f.path.endswith(JOB) for f in files):
        return None
    detail = DatasetDetail(**summary.model_dump(), manifest=manifest, files=len(files),
                           bytes_on_disk=sum(f.size for f in files))
    if progress is not None:
        detail.progress = JobProgress.from_file(progress)
    return detail
