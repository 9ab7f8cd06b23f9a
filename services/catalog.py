"""Reading datasets from the stores: manifests, progress files, sizes. Never shard contents.

Dataset files are read through the models of :mod:`pipeline.dataset` (the one home of the layout, the
manifest and the progress file). Only names that pass :func:`pipeline.dataset.valid_name` (a full match)
are ever joined to a store root, and :class:`pipeline.storage.Store` refuses any path that would leave the
root, so nothing a client sends reads outside a store.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TypeVar

import pyarrow.fs as pafs

from pipeline.dataset import JOB, MANIFEST, PROGRESS, DatasetFileError, Manifest, Progress, valid_name
from pipeline.storage import StorageError, Store
from services.models import DatasetDetail, DatasetSummary, JobProgress

__all__ = ["get_dataset", "list_datasets", "open_store", "read_progress", "valid_name"]
log = logging.getLogger("distillery.services")
MAX_META_BYTES = 16 << 20  # a manifest lists every shard; 16 MiB is ~100k shards
M = TypeVar("M", Manifest, Progress)


@lru_cache(maxsize=64)
def open_store(uri: str, endpoint: str | None = None) -> Store:
    return Store.from_uri(uri, endpoint_override=endpoint)


def _read(model: type[M], store: Store, name: str) -> tuple[M | None, str | None]:
    """``<name>/<model.FILE>`` as a model, or None when missing; a file that is there but unreadable (too
    large, not a regular file, malformed, of an unknown version) is None plus the problem, for the client."""
    path = f"{name}/{model.FILE}"
    try:
        info = store.filesystem.get_file_info(store.join(path))
        if info.type == pafs.FileType.NotFound:
            return None, None
        if info.type != pafs.FileType.File or info.size > MAX_META_BYTES:
            return None, f"{model.FILE} is not a regular file of at most {MAX_META_BYTES} bytes"
        return model.parse(store.read_bytes(path), where=model.FILE), None
    except DatasetFileError as exc:
        log.debug("dataset %s: %s", name, exc)  # shown to clients as the dataset's problem
        return None, str(exc)
    except (OSError, StorageError) as exc:
        log.debug("dataset %s: %s", name, exc)  # the error names server paths: not for clients
        return None, f"{model.FILE} cannot be read"


def read_progress(store: Store, name: str) -> JobProgress | None:
    progress, _ = _read(Progress, store, name)
    return JobProgress.from_progress(progress) if progress is not None else None


def _summary(store: Store, store_uri: str, name: str) -> tuple[DatasetSummary, Manifest | None, Progress | None]:
    manifest, manifest_problem = _read(Manifest, store, name)
    progress, progress_problem = _read(Progress, store, name)
    summary = DatasetSummary(name=name, store=store_uri, complete=manifest is not None,
                             state=progress.state if progress is not None else None,
                             problem="; ".join(p for p in (manifest_problem, progress_problem) if p) or None)
    if manifest is not None:
        counts = manifest.counts
        summary.examples, summary.rows = counts.examples, counts.rows
        summary.target_tokens, summary.bytes = counts.target_tokens, counts.bytes
        summary.shards, summary.dataset_hash = len(manifest.shards), manifest.dataset_hash
    elif progress is not None:
        summary.examples, summary.rows = progress.examples_done, progress.rows_done
        summary.target_tokens, summary.bytes = progress.target_tokens_done, progress.bytes_written
        summary.shards = progress.shards_done
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
    has_job = any(f.path.endswith(f"/{JOB}") for f in files)
    if manifest is None and progress is None and not summary.problem and not has_job:
        return None
    return DatasetDetail(**dict(summary), manifest=manifest, files=len(files), bytes_on_disk=sum(f.size for f in files),
                         progress=JobProgress.from_progress(progress) if progress is not None else None)
