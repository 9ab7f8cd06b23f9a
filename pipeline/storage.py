"""One storage interface for local directories and S3, through ``pyarrow.fs``.

A :class:`Store` is a root (a directory, or an S3 bucket and prefix) plus a
``pyarrow.fs.FileSystem``. Every method takes a path *relative to the root*,
``/``-separated; :meth:`Store.join` checks it can never escape the root and
returns the full filesystem path, for use with ``store.filesystem``::

    store = Store.from_uri("s3://bucket/runs")
    store.write_parquet_atomic("ds1/part-00000.parquet", table)
    dataset = pyarrow.dataset.dataset(store.join("ds1"), filesystem=store.filesystem)

Atomic writes go to ``<name>.tmp-<32 hex>`` and are then moved into place. On
a local disk the move is a ``rename(2)``: readers see the old file or the
whole new one, never a part (durability across power loss would also need an
fsync, which we do not pay for). On S3 a single PUT or multipart upload is
atomic by itself, and the move is a server-side copy plus delete; we still go
through the temporary key because a failed write closes its stream, which
*completes* the upload of whatever was written so far — under the temporary
key, never under the final one. (A server-side copy is limited to 5 GB per
object, far above a shard.)
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ENDPOINT_ENV = "DISTILLERY_S3_ENDPOINT"
_TEMP = re.compile(r"\.tmp-[0-9a-f]{32}\Z")  # \Z, not $: "x.tmp-…\n" is not ours to delete


UMASK_ENV = "DISTILLERY_UMASK"  # e.g. "077": set by the job service so its jobs' datasets are owner-only


def apply_umask() -> None:
    """Apply ``$DISTILLERY_UMASK`` (octal) to this process before it writes to a local store.

    The job service sets it in its jobs' Ray runtime environment; the driver and every worker (which Ray
    starts, so they do not inherit the driver's umask) open their local stores through here.
    """
    value = os.environ.get(UMASK_ENV)
    if value:
        os.umask(int(value, 8))


class StorageError(ValueError):
    """A bad store URI or a path that would escape the store root."""


class FileEntry(NamedTuple):
    """A file in a store: its path relative to the root, and its size in bytes."""

    path: str
    size: int


def _segments(part: str) -> builtins.list[str]:
    """Split one user-given path part, rejecting anything that could escape the root."""
    if not isinstance(part, str):
        raise StorageError(f"path parts must be strings, got {type(part).__name__}")
    if "\x00" in part or "\\" in part:
        raise StorageError(f"path {part!r} contains a NUL or a backslash")
    if part.startswith("/"):
        raise StorageError(f"path {part!r} is absolute; paths are relative to the store root")
    segments = part.split("/")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise StorageError(f"path {part!r} has an empty, '.' or '..' segment")
    return segments


class Store:
    """Files under one root on one ``pyarrow.fs`` filesystem.

    Args:
        filesystem: Where the files live.
        root: Full filesystem path of the root (``/abs/dir`` or ``bucket/prefix``).
    """

    def __init__(self, filesystem: pafs.FileSystem, root: str) -> None:
        self._fs = filesystem
        self._root = root.rstrip("/") if root != "/" else ""
        self._local = isinstance(filesystem, pafs.LocalFileSystem)

    @classmethod
    def from_uri(
        cls, uri: str, *, endpoint_override: str | None = None, region: str | None = None
    ) -> Store:
        """Open ``file:///abs/path``, a plain local path, or ``s3://bucket/prefix``.

        S3 credentials come from the usual ``AWS_*`` variables or config files.

        Args:
            uri: Where the root is.
            endpoint_override: S3 endpoint such as ``http://127.0.0.1:9000``
                (default: ``$DISTILLERY_S3_ENDPOINT``, else AWS).
            region: S3 region (default: the AWS SDK's own lookup).

        Raises:
            StorageError: For an unsupported scheme or a malformed URI.
        """
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise StorageError(f"{uri!r} has no bucket; expected s3://bucket/prefix")
            prefix = parsed.path.strip("/")
            root = "/".join([parsed.netloc, *(_segments(prefix) if prefix else [])])
            return cls(_s3(endpoint_override or os.environ.get(ENDPOINT_ENV), region), root)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StorageError(f"{uri!r} names a remote host; use file:///absolute/path")
            path = unquote(parsed.path)
        elif parsed.scheme == "" or len(parsed.scheme) == 1:  # '' or a Windows drive letter
            path = uri
        else:
            raise StorageError(f"unsupported store URI {uri!r}; use a path, file:// or s3://")
        apply_umask()
        return cls(pafs.LocalFileSystem(), os.path.abspath(path))

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The ``pyarrow.fs`` filesystem, for ``pyarrow.dataset`` and friends."""
        return self._fs

    @property
    def root(self) -> str:
        """Full filesystem path of the root."""
        return self._root or "/"

    @property
    def uri(self) -> str:
        """The root as a URI."""
        return f"file://{self.root}" if self._local else f"s3://{self._root}"

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def join(self, *parts: str) -> str:
        """Full filesystem path of ``parts`` under the root.

        Raises:
            StorageError: If a part is absolute, has empty / ``.`` / ``..``
                segments, a backslash or a NUL.
        """
        segments = [seg for part in parts for seg in _segments(part)]
        return "/".join([self._root, *segments]) if segments else self.root

    def exists(self, path: str) -> bool:
        """Whether a file or directory exists at ``path``."""
        return self._fs.get_file_info(self.join(path)).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        """Read a whole file."""
        with self._fs.open_input_stream(self.join(path)) as f:
            return f.read()

    def read_json(self, path: str) -> Any:
        """Read and parse a JSON file."""
        return json.loads(self.read_bytes(path))

    def open_input(self, path: str) -> pa.NativeFile:
        """Open a file for random access (e.g. ``pq.ParquetFile(store.open_input(p))``)."""
        return self._fs.open_input_file(self.join(path))

    def write_bytes_atomic(self, path: str, data: bytes) -> int:
        """Write ``data`` to ``path`` atomically; return the bytes written."""
        return self._atomic(path, lambda sink: sink.write(data))

    def write_json_atomic(self, path: str, obj: Any) -> int:
        """Write ``obj`` as indented UTF-8 JSON, atomically; return the bytes written."""
        data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
        return self.write_bytes_atomic(path, data)

    def write_parquet_atomic(self, path: str, table: pa.Table, **parquet_kwargs: Any) -> int:
        """Write ``table`` as Parquet, atomically; return the bytes written.

        Args:
            path: Destination, relative to the root.
            table: The table to write.
            **parquet_kwargs: Passed to ``pyarrow.parquet.write_table``.
        """
        return self._atomic(path, lambda sink: pq.write_table(table, sink, **parquet_kwargs))

    def _atomic(self, path: str, write: Callable[[pa.NativeFile], object]) -> int:
        final = self.join(path)
        temp = f"{final}.tmp-{uuid.uuid4().hex}"
        if self._local:  # S3 has no directories to create
            self._fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        try:
            with self._fs.open_output_stream(temp) as sink:
                write(sink)
                size = sink.tell()
            self._fs.move(temp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self._fs.delete_file(temp)
            raise
        return size

    def list(
        self, prefix: str = "", *, suffix: str | None = None, include_temp: bool = False
    ) -> builtins.list[FileEntry]:
        """Files under ``prefix`` (recursively), sorted by path.

        Args:
            prefix: A directory relative to the root; ``""`` for the root.
            suffix: Keep only paths ending with it (e.g. ``".parquet"``).
            include_temp: Also list leftovers of interrupted atomic writes.
        """
        base = self.join(prefix) if prefix else self.root
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        cut = len(self._root) + 1
        entries = [
            FileEntry(info.path[cut:], info.size)
            for info in self._fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and (suffix is None or info.path.endswith(suffix))
            and (include_temp or not _TEMP.search(info.path))
        ]
        return sorted(entries)

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        """Delete one file.

        Raises:
            FileNotFoundError: If it does not exist and ``missing_ok`` is False.
            IsADirectoryError: If ``path`` is a directory.
        """
        full = self.join(path)
        kind = self._fs.get_file_info(full).type
        if kind == pafs.FileType.NotFound:
            if missing_ok:
                return
            raise FileNotFoundError(f"{self.uri}/{path} does not exist")
        if kind == pafs.FileType.Directory:
            raise IsADirectoryError(f"{self.uri}/{path} is a directory")
        self._fs.delete_file(full)

    def cleanup_temp(self, prefix: str = "") -> int:
        """Delete leftovers of interrupted atomic writes under ``prefix``.

        Only call it when nothing is writing under ``prefix``: an in-flight
        write's temporary file looks exactly like a leftover.

        Returns:
            How many files were deleted.
        """
        leftovers = [e for e in self.list(prefix, include_temp=True) if _TEMP.search(e.path)]
        for entry in leftovers:
            self._fs.delete_file(self.join(entry.path))
        return len(leftovers)


def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(scheme=parsed.scheme, endpoint_override=parsed.netloc)
    return pafs.S3FileSystem(**kwargs)
