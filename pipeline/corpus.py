"""Read a parallel corpus into one Arrow table, rejecting bad records with a reason.

Every format (two aligned text files, TSV, JSONL, Parquet) gives the same table, ``CORPUS_SCHEMA``:
``id`` (the id column's value, else the 1-based record number), ``index`` (0-based position of the
record in the input: it never shifts when filters change), ``source`` and ``target`` (stripped).

A bad record never stops the run: it is counted and, with a rejects path, written there as one JSON
object (``line``, ``id`` when known, ``reason``, ``source``/``target`` or the ``raw`` line, each cut
to 200 characters). A rejected record gets exactly one reason, the first failing check of:

1. ``invalid_utf8``  a line is not valid text in its file's encoding (text format: on either side)
2. ``malformed``     wrong TSV field count; JSONL line not an object, lacking a column or holding a
                     non-string value; missing or empty id
3. ``control_char``  id, source or target holds a control character (NUL, ESC, a line break inside a
                     JSONL value, C1 controls, …); tab is ordinary whitespace
4. ``duplicate_id``  the id was used by an earlier record
5. ``empty_source``, 6. ``empty_target`` (a Parquet null is empty)
7. ``too_long``      over ``max_words`` or ``max_chars`` on either side
8. ``length_ratio``  longer/shorter side in words over ``max_length_ratio``
9. ``duplicate``     same (source, target) as an earlier kept record (only with ``dedupe``)

Text files are UTF-8 unless they start with a byte-order mark: UTF-8, UTF-16 LE/BE and UTF-32 LE/BE
files with their mark are decoded as such (a UTF-16 file without one shows as NUL bytes: ``control_char``).
"""

import codecs
import contextlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from pipeline.config import raise_problems
from pipeline.errors import InputError

log = logging.getLogger(__name__)

CORPUS_SCHEMA = pa.schema(
    [("id", pa.string()), ("index", pa.int64()), ("source", pa.string()), ("target", pa.string())]
)
SNIPPET_CHARS = 200  # per field of a reject entry: enough to find the line, small on disk


class CorpusError(InputError):
    """The corpus cannot be read at all (single bad records are rejected instead)."""


class CorpusFormat(StrEnum):
    TEXT = "text"
    TSV = "tsv"
    JSONL = "jsonl"
    PARQUET = "parquet"


class RejectReason(StrEnum):
    """Why a record was rejected, declared in the order the checks run."""

    INVALID_UTF8 = "invalid_utf8"
    MALFORMED = "malformed"
    CONTROL_CHAR = "control_char"
    DUPLICATE_ID = "duplicate_id"
    EMPTY_SOURCE = "empty_source"
    EMPTY_TARGET = "empty_target"
    TOO_LONG = "too_long"
    LENGTH_RATIO = "length_ratio"
    DUPLICATE = "duplicate"


_TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view())
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # Unicode category Cc except tab
_EXTENSIONS = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class CorpusSpec(BaseModel):
    """Where a parallel corpus lives and how to read it.

    ``path`` is the source-side file for ``text`` and the only file otherwise. ``format=None`` means
    ``text`` when ``target_path`` is set, else the format of the extension of ``path``. The columns
    apply to JSONL and Parquet; for TSV, any ``id_column`` means three fields with the id first.
    """

    model_config = ConfigDict(extra="forbid")

    path: str
    target_path: str | None = None
    format: CorpusFormat | None = None
    source_column: str = "source"
    target_column: str = "target"
    id_column: str | None = None

    @model_validator(mode="after")
    def _check_text_files(self) -> "CorpusSpec":
        is_text = self.format is CorpusFormat.TEXT or (self.format is None and self.target_path)
        problems = []
        if is_text and not self.target_path:
            problems.append(("target_path", "format 'text' needs target_path, the file aligned line by line"))
        if self.target_path and not is_text:
            problems.append(("target_path", f"target_path is only for format 'text', not '{self.format}'"))
        if is_text and self.id_column is not None:
            problems.append(("id_column", "format 'text' has no id column: its ids are line numbers"))
        raise_problems(self, problems)
        return self

    def resolved_format(self) -> CorpusFormat:
        """The explicit format, else the one implied by ``target_path`` or the extension.

        Raises:
            CorpusError: The extension is not one of .tsv, .jsonl, .json, .parquet.
        """
        if self.format is not None:
            return self.format
        if self.target_path:
            return CorpusFormat.TEXT
        if (fmt := _EXTENSIONS.get(Path(self.path).suffix.lower())) is None:
            raise CorpusError(
                f"cannot tell the format of {self.path!r} from its extension; "
                f"set format to one of: {', '.join(CorpusFormat)}"
            )
        return CorpusFormat(fmt)


class FilterSpec(BaseModel):
    """Per-record quality filters; ``None`` turns a limit off."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_words: PositiveInt | None = Field(default=250, le=100_000)  # whitespace words per side: more is a paragraph
    max_chars: PositiveInt | None = Field(default=2000, le=10_000_000)  # per side: catches word-less junk (base64)
    max_length_ratio: float | None = Field(default=3.0, ge=1.0, le=1000)  # longer/shorter side, in words
    ratio_min_words: PositiveInt = Field(default=3, le=10_000)  # judge the ratio only if both sides have this many
    dedupe: bool = False  # reject repeats of an earlier kept (source, target) pair


DEFAULT_FILTERS = FilterSpec()


@dataclass(frozen=True)
class CorpusResult:
    """The kept records, plus what was rejected and why."""

    table: pa.Table  # CORPUS_SCHEMA, input order
    total: int  # records read, kept or not
    rejected: dict[str, int]  # reason -> count, non-zero only, in check order
    rejects_path: Path | None = None

    @property
    def kept(self) -> int:
        return self.table.num_rows

    def summary(self) -> str:
        """One line for logs and the CLI."""
        line = (
            f"read {self.total:,} records: kept {self.kept:,}, rejected {self.total - self.kept:,}"
        )
        if self.rejected:
            line += f" ({', '.join(f'{r} {n:,}' for r, n in self.rejected.items())})"
            line += f", listed in {self.rejects_path}" if self.rejects_path else ""
        return line + ("; WARNING: no records kept" if self.kept == 0 else "")


class _Record(NamedTuple):
    line: int  # 1-based record number in the input
    id: str | None
    source: str | None
    target: str | None
    reason: RejectReason | None = None  # set by a reader: invalid_utf8 or malformed
    raw: str | None = None  # the line of a malformed record


# Byte-order marks, longest first: the UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def _encoding(path: Path) -> tuple[str, int]:
    """The file's encoding by its byte-order mark (UTF-8 without one) and the mark's length."""
    with path.open("rb") as f:
        head = f.read(4)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """Yield (1-based line number, line without its break, or None when it is not valid in the file's encoding).

    UTF-8 is read as bytes, so one bad line is rejected, not the whole file. A UTF-16/32 file (which needs its
    byte-order mark) is decoded as text, its undecodable bytes kept as lone surrogates, which reject the line.
    """
    encoding, bom = _encoding(path)
    if encoding != "utf-8":
        # newline="\n": split where the bytes version splits (a lone \r stays in the line and is rejected).
        with path.open("r", encoding=encoding, errors="surrogateescape", newline="\n") as f:
            for n, line in enumerate(f, start=1):
                line = (line.removeprefix("\ufeff") if n == 1 else line).rstrip("\r\n")
                yield n, None if _SURROGATE.search(line) else line
        return
    with path.open("rb") as f:
        f.read(bom)
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield n, None
                continue
            yield n, text.rstrip("\r\n")


def _count_lines(path: Path) -> int:
    if _encoding(path)[0] != "utf-8":
        return sum(1 for _ in _lines(path))
    count, last = 0, b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            count, last = count + chunk.count(b"\n"), chunk[-1:]
    return count + (last != b"\n")  # a last line without a break counts, as in _lines


def _read_text(src_path: Path, tgt_path: Path) -> Iterator[_Record]:
    for (n, src), (_, tgt) in zip(_lines(src_path), _lines(tgt_path), strict=True):
        bad = RejectReason.INVALID_UTF8 if src is None or tgt is None else None
        yield _Record(n, str(n), src and src.strip(), tgt and tgt.strip(), bad)


def _read_tsv(path: Path, with_id: bool) -> Iterator[_Record]:
    for n, text in _lines(path):
        fields = None if text is None else text.split("\t")
        ident = None if with_id else str(n)
        if fields is None:
            yield _Record(n, ident, None, None, RejectReason.INVALID_UTF8)
        elif len(fields) != 2 + with_id:
            yield _Record(n, ident, None, None, RejectReason.MALFORMED, raw=text)
        else:
            ident = fields[0].strip() if with_id else ident
            yield _Record(n, ident, fields[-2].strip(), fields[-1].strip())


def _id_text(value: object) -> str | None:
    """Ids may be strings or integers (JSON, Parquet); anything else is no id."""
    if isinstance(value, str):
        return value.strip()
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _json_object(text: str) -> dict:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _read_jsonl(path: Path, spec: CorpusSpec) -> Iterator[_Record]:
    for n, text in _lines(path):
        obj = {} if text is None else _json_object(text)
        src, tgt = obj.get(spec.source_column), obj.get(spec.target_column)
        ident = _id_text(obj.get(spec.id_column)) if spec.id_column else str(n)
        values = (src, tgt, ident)
        # JSON escapes can smuggle in lone surrogates: not UTF-8, and not storable in Arrow
        if text is None or any(_SURROGATE.search(v) for v in values if isinstance(v, str)):
            yield _Record(
                n, None if spec.id_column else str(n), None, None, RejectReason.INVALID_UTF8
            )
        elif not all(isinstance(v, str) for v in values):
            yield _Record(n, ident, None, None, RejectReason.MALFORMED, raw=text)
        else:
            yield _Record(n, ident, src.strip(), tgt.strip())


def _read_parquet(path: Path, spec: CorpusSpec) -> Iterator[_Record]:
    """Read the whole file now, so that a bad one fails before any output is written."""
    columns = [spec.source_column, spec.target_column, *([spec.id_column] * bool(spec.id_column))]
    try:
        names = pq.read_schema(path).names
        if missing := [c for c in columns if c not in names]:
            raise CorpusError(f"{path} has no column {', '.join(missing)}; it has {names}")
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"cannot read Parquet file {path}: {e}") from e
    for field in table.schema:
        is_id = field.name == spec.id_column  # integer ids are fine too
        if not (field.type in _TEXT_TYPES or (is_id and pa.types.is_integer(field.type))):
            raise CorpusError(f"column {field.name!r} of {path} holds {field.type}, not strings")
    src, tgt, *ids = (table.column(c).to_pylist() for c in columns)
    return (
        _Record(
            i + 1, _id_text(ids[0][i]) if ids else str(i + 1), (s or "").strip(), (t or "").strip()
        )
        for i, (s, t) in enumerate(zip(src, tgt, strict=True))
    )


def _open(spec: CorpusSpec) -> Iterator[_Record]:
    """Check the input and return its records; every CorpusError is raised here, before any work."""
    fmt = spec.resolved_format()
    paths = [Path(p) for p in (spec.path, spec.target_path) if p]
    for path in paths:
        if not path.is_file():
            raise CorpusError(f"corpus file not found: {path}")
    if fmt is CorpusFormat.TEXT:
        counts = [_count_lines(p) for p in paths]
        if counts[0] != counts[1]:
            raise CorpusError(
                f"source and target differ in line count: {counts[0]:,} lines in {paths[0]}, "
                f"{counts[1]:,} lines in {paths[1]}"
            )
        return _read_text(*paths)
    if fmt is CorpusFormat.TSV:
        return _read_tsv(paths[0], with_id=spec.id_column is not None)
    if fmt is CorpusFormat.JSONL:
        return _read_jsonl(paths[0], spec)
    return _read_parquet(paths[0], spec)


def _check(
    rec: _Record, f: FilterSpec, seen_ids: set[str] | None, seen_pairs: set[tuple[str, str]]
) -> RejectReason | None:
    """The first failing check (module docstring order) for a decoded record."""
    if not rec.id:
        return RejectReason.MALFORMED
    if any(_CONTROL.search(text) for text in (rec.id, rec.source, rec.target) if text):
        return RejectReason.CONTROL_CHAR
    if seen_ids is not None:  # line-number ids are unique by construction
        if rec.id in seen_ids:
            return RejectReason.DUPLICATE_ID
        seen_ids.add(rec.id)
    src, tgt = rec.source, rec.target
    if not src:
        return RejectReason.EMPTY_SOURCE
    if not tgt:
        return RejectReason.EMPTY_TARGET
    short, long = sorted((len(src.split()), len(tgt.split())))
    if (f.max_words and long > f.max_words) or (
        f.max_chars and max(len(src), len(tgt)) > f.max_chars
    ):
        return RejectReason.TOO_LONG
    # Short pairs are exempt: "Yes." vs "Yes, he did." is a legitimate 1:3.
    if f.max_length_ratio and short >= f.ratio_min_words and long > f.max_length_ratio * short:
        return RejectReason.LENGTH_RATIO
    if f.dedupe:
        if (src, tgt) in seen_pairs:
            return RejectReason.DUPLICATE
        seen_pairs.add((src, tgt))
    return None


# Characters that str.splitlines() and other readers take for line breaks although JSON leaves them raw.
_LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def _json_line(entry: dict[str, object]) -> str:
    return json.dumps(entry, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


def _reject_entry(rec: _Record, reason: RejectReason) -> dict[str, object]:
    entry: dict[str, object] = {"line": rec.line, "id": rec.id, "reason": str(reason)}
    for key in ("source", "target", "raw"):
        entry[key] = None if (text := getattr(rec, key)) is None else text[:SNIPPET_CHARS]
    return {k: v for k, v in entry.items() if v is not None}


def read_corpus(
    spec: CorpusSpec,
    filters: FilterSpec = DEFAULT_FILTERS,
    *,
    rejects_path: str | Path | None = None,
) -> CorpusResult:
    """Read, validate and filter a parallel corpus.

    Args:
        spec: Which file(s), in which format.
        filters: Quality filters applied to every decoded record.
        rejects_path: JSONL file listing every rejected record (overwritten); None only counts.

    Returns:
        The kept records as a ``CORPUS_SCHEMA`` table in input order, with the reject counts.

    Raises:
        CorpusError: A file is missing or unreadable, the format unknown, a Parquet column missing
            or not text, or the two text files differ in line count; raised before the rejects
            file is created.
    """
    records = _open(spec)
    out = Path(rejects_path) if rejects_path is not None else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    ids, index, sources, targets = [], [], [], []
    counts: Counter[RejectReason] = Counter()
    seen_ids, seen_pairs = (set() if spec.id_column else None), set()
    total = 0
    try:
        with out.open("w", encoding="utf-8") if out else contextlib.nullcontext() as sink:
            for rec in records:
                total += 1
                if (reason := rec.reason or _check(rec, filters, seen_ids, seen_pairs)) is None:
                    ids.append(rec.id)
                    index.append(rec.line - 1)
                    sources.append(rec.source)
                    targets.append(rec.target)
                    continue
                counts[reason] += 1
                if sink is not None:
                    sink.write(_json_line(_reject_entry(rec, reason)))
    except OSError as e:
        raise CorpusError(f"cannot read corpus {spec.path}: {e}") from e
    columns = {"id": ids, "index": index, "source": sources, "target": targets}
    table = pa.table(columns, schema=CORPUS_SCHEMA)
    result = CorpusResult(table, total, {str(r): counts[r] for r in RejectReason if counts[r]}, out)
    if result.kept == 0:
        log.warning("corpus %s: %s", spec.path, result.summary())
    return result
