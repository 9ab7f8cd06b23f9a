import codecs
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest

from pipeline.corpus import (
    CORPUS_SCHEMA,
    CorpusError,
    CorpusFormat,
    CorpusSpec,
    FilterSpec,
    RejectReason,
    read_corpus,
)

GOOD = [
    ("Guten Morgen.", "Good morning."),
    ("Das Haus ist groß.", "The house is big."),
    ("Wir gehen heute nach Hause.", "We are going home today."),
]


def _write_text(tmp_path: Path, src: list[bytes], tgt: list[bytes]) -> CorpusSpec:
    (tmp_path / "c.de").write_bytes(b"\n".join(src) + b"\n")
    (tmp_path / "c.en").write_bytes(b"\n".join(tgt) + b"\n")
    return CorpusSpec(path=str(tmp_path / "c.de"), target_path=str(tmp_path / "c.en"))


def _write_lines(path: Path, lines: list[bytes], fmt: str | None = None, **kw) -> CorpusSpec:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return CorpusSpec(path=str(path), format=fmt, **kw)


def _jsonl(rows: list[dict]) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode() for r in rows]


def _rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _pairs(result) -> list[tuple[str, str]]:
    return list(
        zip(result.table["source"].to_pylist(), result.table["target"].to_pylist(), strict=True)
    )


def _write_all_formats(tmp_path: Path, pairs: list[tuple[str, str]]) -> dict[str, CorpusSpec]:
    """The same corpus as text, TSV, JSONL and Parquet."""
    enc = [(s.encode(), t.encode()) for s, t in pairs]
    (tmp_path / "c.de").write_bytes(b"".join(s + b"\n" for s, _ in enc))
    (tmp_path / "c.en").write_bytes(b"".join(t + b"\n" for _, t in enc))
    (tmp_path / "c.tsv").write_bytes(b"".join(s + b"\t" + t + b"\n" for s, t in enc))
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(_jsonl([{"de": s, "en": t} for s, t in pairs])))
    pq.write_table(
        pa.table({"de": [s for s, _ in pairs], "en": [t for _, t in pairs]}), tmp_path / "c.parquet"
    )
    cols = {"source_column": "de", "target_column": "en"}
    return {
        "text": CorpusSpec(path=str(tmp_path / "c.de"), target_path=str(tmp_path / "c.en")),
        "tsv": CorpusSpec(path=str(tmp_path / "c.tsv")),
        "jsonl": CorpusSpec(path=str(tmp_path / "c.jsonl"), **cols),
        "parquet": CorpusSpec(path=str(tmp_path / "c.parquet"), **cols),
    }


# --- one test per reject reason -------------------------------------------------------------


def test_invalid_utf8_on_either_side_of_text_rejects_the_pair(tmp_path):
    spec = _write_text(
        tmp_path,
        [b"Guten Morgen.", b"kaputt \xff\xfe", b"Das Haus ist gro\xc3\x9f.", b"Wir gehen."],
        [b"Good morning.", b"broken", b"The house is big.", b"We \xc3 go."],
    )
    result = read_corpus(spec, rejects_path=tmp_path / "rej.jsonl")
    assert result.rejected == {"invalid_utf8": 2}
    assert result.table["id"].to_pylist() == ["1", "3"]
    assert result.table["index"].to_pylist() == [0, 2]
    assert _pairs(result) == GOOD[:2]
    rejects = _rejects(tmp_path / "rej.jsonl")
    assert [(r["line"], r["id"], r["reason"]) for r in rejects] == [
        (2, "2", "invalid_utf8"),
        (4, "4", "invalid_utf8"),
    ]
    # the decodable side is kept for inspection, the undecodable one is left out
    assert rejects[0] == {"line": 2, "id": "2", "reason": "invalid_utf8", "target": "broken"}
    assert rejects[1]["source"] == "Wir gehen." and "target" not in rejects[1]


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_invalid_utf8_line_in_single_file_formats(tmp_path, fmt):
    good = (
        [f"{s}\t{t}".encode() for s, t in GOOD]
        if fmt == "tsv"
        else _jsonl([{"source": s, "target": t} for s, t in GOOD])
    )
    spec = _write_lines(tmp_path / f"c.{fmt}", [good[0], b"\xc0\xaf bad", good[1], good[2]])
    result = read_corpus(spec, rejects_path=tmp_path / "rej.jsonl")
    assert result.total == 4
    assert result.rejected == {"invalid_utf8": 1}
    assert _pairs(result) == GOOD
    assert result.table["id"].to_pylist() == ["1", "3", "4"]
    assert _rejects(tmp_path / "rej.jsonl") == [{"line": 2, "id": "2", "reason": "invalid_utf8"}]


def test_jsonl_lone_surrogate_escape_is_invalid_utf8(tmp_path):
    spec = _write_lines(
        tmp_path / "c.jsonl",
        [
            b'{"source": "a \\ud800 b", "target": "x y"}',
            *_jsonl([{"source": GOOD[0][0], "target": GOOD[0][1]}]),
        ],
    )
    result = read_corpus(spec, rejects_path=tmp_path / "rej.jsonl")
    assert result.rejected == {"invalid_utf8": 1}
    assert _pairs(result) == GOOD[:1]
    assert _rejects(tmp_path / "rej.jsonl")[0]["line"] == 1


def test_malformed_tsv_lines(tmp_path):
    lines = [
        b"Guten Morgen.\tGood morning.",
        b"only one field",
        b"Das Haus ist gro\xc3\x9f.\tThe house is big.",
        b"a\tb\tc",
        b"",
        b"Wir gehen heute nach Hause.\tWe are going home today.",
    ]
    spec = _write_lines(tmp_path / "c.tsv", lines)
    result = read_corpus(spec, rejects_path=tmp_path / "rej.jsonl")
    assert result.rejected == {"malformed": 3}
    assert _pairs(result) == GOOD
    rejects = _rejects(tmp_path / "rej.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "malformed"),
        (4, "malformed"),
        (5, "malformed"),
    ]
    assert rejects[0]["raw"] == "only one field"


def test_malformed_jsonl_lines(tmp_path):
    lines = [
        *_jsonl([{"source": GOOD[0][0], "target": GOOD[0][1]}]),
        b"not json at all",
        b'["a", "list"]',
        *_jsonl([{"source": "nur Quelle"}]),  # lacks the target column
        *_jsonl([{"source": "Zahl", "target": 42}]),  # non-string value
        *_jsonl([{"source": None, "target": "null source"}]),
        *_jsonl([{"source": s, "target": t} for s, t in GOOD[1:]]),
    ]
    spec = _write_lines(tmp_path / "c.jsonl", lines)
    result = read_corpus(spec, rejects_path=tmp_path / "rej.jsonl")
    assert result.rejected == {"malformed": 5}
    assert _pairs(result) == GOOD
    assert result.table["id"].to_pylist() == ["1", "7", "8"]
    assert [r["line"] for r in _rejects(tmp_path / "rej.jsonl")] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("src", "tgt", "reason"),
    [("   ", "Hello.", "empty_source"), ("Hallo.", "\t \r", "empty_target")],
)
def test_empty_sides_in_text(tmp_path, src, tgt, reason):
    srcs = [s.encode() for s, _ in GOOD]
    tgts = [t.encode() for _, t in GOOD]
    srcs.insert(1, src.encode())
    tgts.insert(1, tgt.encode())
    result = read_corpus(_write_text(tmp_path, srcs, tgts), rejects_path=tmp_path / "rej.jsonl")
    assert result.rejected == {reason: 1}
    assert _pairs(result) == GOOD
    assert [(r["line"], r["id"], r["reason"]) for r in _rejects(tmp_path / "rej.jsonl")] == [
        (2, "2", reason)
    ]


def test_parquet_nulls_are_empty(tmp_path):
    pq.write_table(
        pa.table(
            {
                "source": [GOOD[0][0], None, "Hallo.", GOOD[1][0]],
                "target": [GOOD[0][1], "Hello.", None, GOOD[1][1]],
            }
        ),
        tmp_path / "c.parquet",
    )
    result = read_corpus(CorpusSpec(path=str(tmp_path / "c.parquet")), rejects_path=tmp_path / "r")
    assert result.rejected == {"empty_source": 1, "empty_target": 1}
    assert _pairs(result) == GOOD[:2]
    assert [(r["line"], r["reason"]) for r in _rejects(tmp_path / "r")] == [
        (2, "empty_source"),
        (3, "empty_target"),
    ]


def test_too_long_by_words_or_chars_on_either_side(tmp_path):
    srcs = [GOOD[0][0], "w " * 11, "kurz", GOOD[1][0], "x" * 60]
    tgts = [GOOD[0][1], "short", "v " * 11, GOOD[1][1], "y"]
    spec = _write_text(tmp_path, [s.encode() for s in srcs], [t.encode() for t in tgts])
    filters = FilterSpec(max_words=10, max_chars=50, max_length_ratio=None)
    result = read_corpus(spec, filters, rejects_path=tmp_path / "rej.jsonl")
    assert result.rejected == {"too_long": 3}
    assert _pairs(result) == GOOD[:2]
    assert [r["line"] for r in _rejects(tmp_path / "rej.jsonl")] == [2, 3, 5]
    # the same corpus passes once the limits are off
    unlimited = FilterSpec(max_words=None, max_chars=None, max_length_ratio=None)
    assert read_corpus(spec, unlimited).kept == 5


def test_length_ratio_spares_short_pairs(tmp_path):
    srcs = ["eins zwei drei", "Ja.", "eins zwei drei", GOOD[2][0]]
    tgts = [
        "one two three four five six seven eight nine ten",
        "Yes, he did.",
        "one two",
        GOOD[2][1],
    ]
    spec = _write_text(tmp_path, [s.encode() for s in srcs], [t.encode() for t in tgts])
    result = read_corpus(spec, rejects_path=tmp_path / "rej.jsonl")
    # 3 vs 10 words: rejected; 1 vs 3 and 3 vs 2 words: too short to judge, kept
    assert result.rejected == {"length_ratio": 1}
    assert result.table["id"].to_pylist() == ["2", "3", "4"]
    assert _rejects(tmp_path / "rej.jsonl") == [
        {"line": 1, "id": "1", "reason": "length_ratio", "source": srcs[0], "target": tgts[0]}
    ]
    assert read_corpus(spec, FilterSpec(max_length_ratio=4.0)).kept == 4


def test_duplicates_rejected_only_with_dedupe(tmp_path):
    pairs = [GOOD[0], GOOD[1], GOOD[0], (GOOD[0][0], "Morning!"), GOOD[2], GOOD[1]]
    spec = _write_text(tmp_path, [s.encode() for s, _ in pairs], [t.encode() for _, t in pairs])
    assert read_corpus(spec).kept == 6
    result = read_corpus(spec, FilterSpec(dedupe=True), rejects_path=tmp_path / "rej.jsonl")
    assert result.rejected == {"duplicate": 2}
    assert result.table["id"].to_pylist() == ["1", "2", "4", "5"]
    assert [(r["line"], r["reason"]) for r in _rejects(tmp_path / "rej.jsonl")] == [
        (3, "duplicate"),
        (6, "duplicate"),
    ]


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_duplicate_id(tmp_path, fmt):
    ids = ["a", "b", "a", "c"]
    pairs = [GOOD[0], GOOD[1], ("Nochmal a.", "Again a."), GOOD[2]]
    path = tmp_path / f"c.{fmt}"
    if fmt == "tsv":
        _write_lines(
            path, [f"{i}\t{s}\t{t}".encode() for i, (s, t) in zip(ids, pairs, strict=True)]
        )
    elif fmt == "jsonl":
        _write_lines(
            path,
            _jsonl(
                [{"k": i, "source": s, "target": t} for i, (s, t) in zip(ids, pairs, strict=True)]
            ),
        )
    else:
        pq.write_table(
            pa.table({"k": ids, "source": [s for s, _ in pairs], "target": [t for _, t in pairs]}),
            path,
        )
    result = read_corpus(CorpusSpec(path=str(path), id_column="k"), rejects_path=tmp_path / "r")
    assert result.rejected == {"duplicate_id": 1}
    assert result.table["id"].to_pylist() == ["a", "b", "c"]
    assert result.table["index"].to_pylist() == [0, 1, 3]
    assert _pairs(result) == GOOD
    rejects = _rejects(tmp_path / "r")
    assert [(r["line"], r["id"], r["reason"]) for r in rejects] == [(3, "a", "duplicate_id")]
    assert rejects[0]["source"] == "Nochmal a."


def test_missing_or_empty_id_is_malformed(tmp_path):
    rows = [
        {"k": "a", "source": GOOD[0][0], "target": GOOD[0][1]},
        {"source": "ohne id", "target": "no id"},
        {"k": " ", "source": "leere id", "target": "blank id"},
        {"k": 7, "source": GOOD[1][0], "target": GOOD[1][1]},  # integer ids are accepted
    ]
    spec = _write_lines(tmp_path / "c.jsonl", _jsonl(rows), id_column="k")
    result = read_corpus(spec, rejects_path=tmp_path / "r")
    assert result.rejected == {"malformed": 2}
    assert result.table["id"].to_pylist() == ["a", "7"]
    assert [r["line"] for r in _rejects(tmp_path / "r")] == [2, 3]


def test_control_characters_are_rejected_with_their_own_reason(tmp_path):
    lines = [
        b"Guten Tag\tGood day",
        b"Null\x00byte\tnull byte",  # NUL
        b"Escape\tan \x1b[31mANSI\x1b[0m colour",  # ESC in the target
        b"C1 \xc2\x85 next line\tC1 control",  # U+0085, a C1 control
        b"Wagen\x7f\tDEL",
        b"Zeile mit\rWagenr\xc3\xbccklauf\tcarriage return inside",  # a lone CR mid-line
    ]
    spec = _write_lines(tmp_path / "c.tsv", lines)
    result = read_corpus(spec, rejects_path=tmp_path / "r")
    assert _pairs(result) == [("Guten Tag", "Good day")]
    assert result.rejected == {"control_char": 5}
    assert [(r["line"], r["reason"]) for r in _rejects(tmp_path / "r")] == [(n, "control_char") for n in range(2, 7)]
    # A tab inside a text-format line is ordinary whitespace; a newline smuggled into a JSONL value is not.
    text = _write_text(tmp_path, [b"ein\tTab", b"zwei"], [b"a tab", b"two"])
    assert _pairs(read_corpus(text)) == [("ein\tTab", "a tab"), ("zwei", "two")]
    jsonl = _write_lines(tmp_path / "c.jsonl", _jsonl([{"source": "eins\nzwei", "target": "one two"},
                                                     {"source": "drei", "target": "three", "id": "x\x00"}]),
                         id_column=None)
    assert read_corpus(jsonl).rejected == {"control_char": 1}


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
                                      "utf-32-be"])
def test_files_with_a_byte_order_mark_are_decoded_by_it(tmp_path, encoding):
    pairs = [("Größe", "size"), ("Straße ☃", "street"), ("日本語", "Japanese")]
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE, "utf-32-le": codecs.BOM_UTF32_LE,
           "utf-32-be": codecs.BOM_UTF32_BE}.get(encoding, b"")  # the others write their own mark
    (tmp_path / "c.tsv").write_bytes(bom + "".join(f"{s}\t{t}\r\n" for s, t in pairs).encode(encoding))
    (tmp_path / "c.de").write_bytes(bom + "".join(f"{s}\n" for s, _ in pairs).encode(encoding))
    (tmp_path / "c.en").write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")
    for spec in (CorpusSpec(path=str(tmp_path / "c.tsv")),
                 CorpusSpec(path=str(tmp_path / "c.de"), target_path=str(tmp_path / "c.en"))):
        result = read_corpus(spec)
        assert _pairs(result) == pairs and result.rejected == {}


def test_utf16_without_a_byte_order_mark_is_rejected_not_kept(tmp_path):
    (tmp_path / "c.tsv").write_bytes("Größe\tsize\nHaus\thouse\n".encode("utf-16-le"))
    result = read_corpus(CorpusSpec(path=str(tmp_path / "c.tsv")))
    assert result.kept == 0 and sum(result.rejected.values()) == result.total


def test_one_reason_per_record_in_check_order(tmp_path):
    rows = [
        {"k": "a", "source": "x " * 20, "target": "y"},  # too long and a bad ratio: too_long
        {"k": "a", "source": "", "target": ""},  # duplicate id and empty: duplicate_id
        {"k": "b", "source": "", "target": ""},  # empty on both sides: empty_source
    ]
    spec = _write_lines(tmp_path / "c.jsonl", _jsonl(rows), id_column="k")
    result = read_corpus(spec, FilterSpec(max_words=10), rejects_path=tmp_path / "r")
    assert [r["reason"] for r in _rejects(tmp_path / "r")] == [
        "too_long",
        "duplicate_id",
        "empty_source",
    ]
    assert list(result.rejected) == ["duplicate_id", "empty_source", "too_long"]  # check order
    assert sum(result.rejected.values()) == result.total == 3
    assert list(RejectReason)[:4] == ["invalid_utf8", "malformed", "control_char", "duplicate_id"]


def test_reject_snippets_are_truncated(tmp_path):
    long_src = "ä" * 300
    spec = _write_text(tmp_path, [long_src.encode()], [b""])
    read_corpus(spec, rejects_path=tmp_path / "r")
    (entry,) = _rejects(tmp_path / "r")
    assert entry["source"] == "ä" * 200 and entry["reason"] == "empty_target"


# --- structure errors ----------------------------------------------------------------------


def test_line_count_mismatch_fails_before_any_output(tmp_path):
    spec = _write_text(tmp_path, [b"a", b"b", b"c"], [b"x", b"y"])
    rejects = tmp_path / "out" / "rejects.jsonl"
    with pytest.raises(CorpusError) as err:
        read_corpus(spec, rejects_path=rejects)
    message = str(err.value)
    assert "3 lines" in message and "2 lines" in message
    assert "c.de" in message and "c.en" in message
    assert not rejects.exists() and not rejects.parent.exists()


def test_last_line_without_newline_counts(tmp_path):
    (tmp_path / "a").write_bytes(b"eins\nzwei")
    (tmp_path / "b").write_bytes(b"one\ntwo\n")
    result = read_corpus(CorpusSpec(path=str(tmp_path / "a"), target_path=str(tmp_path / "b")))
    assert _pairs(result) == [("eins", "one"), ("zwei", "two")]


def test_missing_file_is_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(CorpusSpec(path=str(tmp_path / "nope.tsv")))
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(CorpusError, match="b.txt"):
        read_corpus(CorpusSpec(path=str(tmp_path / "a.txt"), target_path=str(tmp_path / "b.txt")))


def test_parquet_problems_are_corpus_errors(tmp_path):
    pq.write_table(pa.table({"source": ["a"], "tgt": ["b"]}), tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match="target"):
        read_corpus(CorpusSpec(path=str(tmp_path / "c.parquet")), rejects_path=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    pq.write_table(pa.table({"source": ["a"], "target": [1]}), tmp_path / "n.parquet")
    with pytest.raises(CorpusError, match="not strings"):
        read_corpus(CorpusSpec(path=str(tmp_path / "n.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError, match="cannot read Parquet"):
        read_corpus(CorpusSpec(path=str(tmp_path / "bad.parquet")))


def test_format_inference(tmp_path):
    def fmt(path, **kw):
        return CorpusSpec(path=path, **kw).resolved_format()

    assert fmt("x.tsv") is CorpusFormat.TSV
    assert fmt("x.JSONL") is CorpusFormat.JSONL
    assert fmt("x.json") is CorpusFormat.JSONL
    assert fmt("dir/x.parquet") is CorpusFormat.PARQUET
    assert fmt("x.de", target_path="x.en") is CorpusFormat.TEXT
    assert fmt("x.txt", format="tsv") is CorpusFormat.TSV
    with pytest.raises(CorpusError, match="set format"):
        fmt("x.txt")
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="set format"):
        read_corpus(CorpusSpec(path=str(tmp_path / "c.csv")))


def test_spec_validation():
    with pytest.raises(pydantic.ValidationError, match="needs target_path"):
        CorpusSpec(path="a.txt", format="text")
    with pytest.raises(pydantic.ValidationError, match="only for format 'text'"):
        CorpusSpec(path="a.tsv", target_path="b.tsv", format="tsv")
    with pytest.raises(pydantic.ValidationError, match="no id column"):
        CorpusSpec(path="a", target_path="b", id_column="id")
    with pytest.raises(pydantic.ValidationError):
        CorpusSpec(path="a.tsv", colums="typo")
    with pytest.raises(pydantic.ValidationError):
        CorpusSpec(path="a.xml", format="xml")
    with pytest.raises(pydantic.ValidationError):
        FilterSpec(max_words=0)


# --- ids and content are the same whatever the format ------------------------------------


def test_same_corpus_same_table_in_every_format(tmp_path):
    pairs = [
        GOOD[0],
        ("  Leerzeichen rundherum \r", " spaces around  "),
        ("", "empty source"),
        GOOD[1],
        ("ünïcödé ✓", "unicode ✓"),
        GOOD[2],
    ]
    specs = _write_all_formats(tmp_path, pairs)
    tables = {name: read_corpus(spec).table for name, spec in specs.items()}
    expected = pa.table(
        {
            "id": ["1", "2", "4", "5", "6"],
            "index": [0, 1, 3, 4, 5],
            "source": [GOOD[0][0], "Leerzeichen rundherum", GOOD[1][0], "ünïcödé ✓", GOOD[2][0]],
            "target": [GOOD[0][1], "spaces around", GOOD[1][1], "unicode ✓", GOOD[2][1]],
        },
        schema=CORPUS_SCHEMA,
    )
    for name, table in tables.items():
        assert table.schema == CORPUS_SCHEMA, name
        assert table.equals(expected), name
    again = read_corpus(specs["jsonl"]).table
    assert again.equals(tables["jsonl"])


def test_crlf_and_bom_are_not_content(tmp_path):
    (tmp_path / "c.tsv").write_bytes(b"\xef\xbb\xbfHallo.\tHello.\r\nTsch\xc3\xbcss.\tBye.\r\n")
    result = read_corpus(CorpusSpec(path=str(tmp_path / "c.tsv")))
    assert _pairs(result) == [("Hallo.", "Hello."), ("Tschüss.", "Bye.")]


# --- result ---------------------------------------------------------------------------------


def test_summary_and_empty_result(tmp_path):
    spec = _write_text(tmp_path, [b"", b"a"], [b"x", b""])
    result = read_corpus(spec, rejects_path=tmp_path / "r")
    assert result.kept == 0 and result.total == 2
    assert result.table.schema == CORPUS_SCHEMA
    summary = result.summary()
    assert "read 2 records" in summary and "kept 0" in summary
    assert "empty_source 1" in summary and "empty_target 1" in summary
    assert "WARNING" in summary and str(tmp_path / "r") in summary
    assert result.rejects_path == tmp_path / "r"


def test_rejects_file_is_written_even_when_clean(tmp_path):
    spec = _write_text(tmp_path, [b"a"], [b"x"])
    result = read_corpus(spec, rejects_path=tmp_path / "sub" / "r.jsonl")
    assert result.rejected == {} and result.kept == 1
    assert (tmp_path / "sub" / "r.jsonl").read_text() == ""
    assert "WARNING" not in result.summary()
    assert read_corpus(spec).rejects_path is None
