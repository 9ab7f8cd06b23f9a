"""Tests for pipeline.storage, against a local directory and a real S3 server (moto)."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.storage import FileEntry, StorageError, Store
from tests.conftest import make_bucket

TABLE = pa.table({"id": ["a", "b", "c"], "x": pa.array([1.5, 2.5, 3.5], pa.float32())})


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store.from_uri(str(tmp_path / "root"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return Store.from_uri(
        f"s3://{make_bucket(endpoint)}/runs", endpoint_override=endpoint, region="us-east-1"
    )


def test_bytes_and_json_round_trip(store):
    assert store.write_bytes_atomic("a/b/blob.bin", b"\x00\x01abc") == 5
    assert store.read_bytes("a/b/blob.bin") == b"\x00\x01abc"
    obj = {"name": "größe", "counts": [1, 2], "nested": {"ok": True}}
    store.write_json_atomic("a/manifest.json", obj)
    assert store.read_json("a/manifest.json") == obj
    assert store.exists("a/manifest.json") and store.exists("a")
    assert not store.exists("a/missing.json")
    store.write_bytes_atomic("a/b/blob.bin", b"new")  # overwrite in place
    assert store.read_bytes("a/b/blob.bin") == b"new"


def test_parquet_round_trip_and_dataset_access(store):
    size = store.write_parquet_atomic("ds/part-00000.parquet", TABLE, compression="zstd")
    store.write_parquet_atomic("ds/part-00001.parquet", TABLE.slice(1))
    assert store.list("ds", suffix=".parquet")[0] == FileEntry("ds/part-00000.parquet", size)
    with store.open_input("ds/part-00000.parquet") as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        assert pf.read().equals(TABLE)
    dataset = ds.dataset(store.join("ds"), filesystem=store.filesystem, format="parquet")
    assert dataset.count_rows() == 5
    assert sorted(dataset.to_table()["id"].to_pylist()) == ["a", "b", "b", "c", "c"]


def test_list_prefix_suffix_and_order(store):
    for name in ("d/2.parquet", "d/1.parquet", "d/sub/3.parquet", "d/notes.txt", "e/4.parquet"):
        store.write_bytes_atomic(name, b"xx")
    assert [e.path for e in store.list("d", suffix=".parquet")] == [
        "d/1.parquet",
        "d/2.parquet",
        "d/sub/3.parquet",
    ]
    assert len(store.list()) == 5 and all(e.size == 2 for e in store.list())
    assert store.list("nothing-here") == []


def test_atomic_write_leaves_no_temp_file(store):
    store.write_parquet_atomic("ds/part.parquet", TABLE)
    store.write_json_atomic("ds/manifest.json", {"n": 1})
    assert [e.path for e in store.list(include_temp=True)] == [
        "ds/manifest.json",
        "ds/part.parquet",
    ]


def test_crash_mid_write_leaves_no_final_and_no_temp(store, monkeypatch):
    def half_written(table, sink, **kwargs):
        sink.write(b"PAR1 and then the process dies")
        raise RuntimeError("disk on fire")

    store.write_bytes_atomic("ds/old.parquet", b"previous shard")
    monkeypatch.setattr(storage.pq, "write_table", half_written)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.write_parquet_atomic("ds/new.parquet", TABLE)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.write_parquet_atomic("ds/old.parquet", TABLE)
    assert not store.exists("ds/new.parquet")
    assert store.read_bytes("ds/old.parquet") == b"previous shard"  # old content survives
    assert [e.path for e in store.list(include_temp=True)] == ["ds/old.parquet"]


def test_cleanup_temp_removes_only_leftovers(store):
    store.write_bytes_atomic("ds/part-00000.parquet", b"done")
    leftover = store.join("ds/part-00001.parquet") + f".tmp-{uuid.uuid4().hex}"
    with store.filesystem.open_output_stream(leftover) as f:  # a killed writer's remains
        f.write(b"partial")
    store.write_bytes_atomic("ds/looks.tmp-like.txt", b"keep")  # not our temp pattern
    assert [e.path for e in store.list("ds")] == ["ds/looks.tmp-like.txt", "ds/part-00000.parquet"]
    assert len(store.list("ds", include_temp=True)) == 3
    assert store.cleanup_temp("ds") == 1
    assert len(store.list("ds", include_temp=True)) == 2
    assert store.cleanup_temp() == 0


def test_delete(store):
    store.write_bytes_atomic("x/y.bin", b"1")
    store.delete("x/y.bin")
    assert not store.exists("x/y.bin")
    with pytest.raises(FileNotFoundError):
        store.delete("x/y.bin")
    store.delete("x/y.bin", missing_ok=True)
    with pytest.raises(FileNotFoundError):
        store.read_bytes("x/y.bin")


BAD_PATHS = [
    "/etc/passwd",
    "../escape",
    "a/../../escape",
    "a//b",
    "a/./b",
    "a\\..\\b",
    "a\x00b",
    "",
]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_paths_never_escape_the_root(store, bad):
    with pytest.raises(StorageError):
        store.join(bad)
    with pytest.raises(StorageError):
        store.join("ok", bad)
    with pytest.raises(StorageError):
        store.write_bytes_atomic(bad, b"evil")
    with pytest.raises(StorageError):
        store.read_bytes(bad)
    if bad:  # list("") means the root
        with pytest.raises(StorageError):
            store.list(bad)
    assert store.list(include_temp=True) == []


def test_join_shape(store):
    assert store.join() == store.root
    assert store.join("a/b", "c.parquet") == f"{store.root}/a/b/c.parquet"
    assert store.uri.startswith(("file:///", "s3://"))


def test_local_uris(tmp_path, monkeypatch):
    a = Store.from_uri(f"file://{tmp_path}/r")
    assert a.root == f"{tmp_path}/r" and a.uri == f"file://{tmp_path}/r"
    monkeypatch.chdir(tmp_path)
    b = Store.from_uri("rel/dir")
    assert b.root == os.path.join(str(tmp_path), "rel", "dir")
    b.write_bytes_atomic("f.txt", b"hi")
    assert (tmp_path / "rel" / "dir" / "f.txt").read_bytes() == b"hi"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/x", "unsupported store URI"),
        ("s3:///prefix", "no bucket"),
        ("file://otherhost/x", "remote host"),
        ("s3://bucket/../x", "'..' segment"),
    ],
)
def test_bad_uris(uri, message):
    with pytest.raises(StorageError, match=message):
        Store.from_uri(uri)


def test_s3_endpoint_from_environment(s3_endpoint, monkeypatch):
    bucket = make_bucket(s3_endpoint)
    monkeypatch.setenv(storage.ENDPOINT_ENV, s3_endpoint)
    store = Store.from_uri(f"s3://{bucket}", region="us-east-1")
    assert store.root == bucket and store.uri == f"s3://{bucket}"
    store.write_bytes_atomic("top.txt", b"at the bucket root")
    assert store.list() == [FileEntry("top.txt", 18)]


def test_only_exact_temp_names_are_cleaned_up(tmp_path):
    store = Store.from_uri(str(tmp_path))
    lookalike = f"ds/part-00000.parquet.tmp-{uuid.uuid4().hex}\n"  # not a name our writers make
    store.write_bytes_atomic(lookalike, b"keep")
    assert store.cleanup_temp("ds") == 0 and [e.path for e in store.list("ds")] == [lookalike]
