"""`prepare`: a corpus with repeats splits without leaks and says how many repeats it holds; a refused corpus
leaves nothing behind."""

import json
import random
from collections import Counter

import pyarrow.parquet as pq
import pytest

from pipeline.corpus import CorpusError, CorpusSpec
from pipeline.errors import InputError
from pipeline.prepare import SPLITS, prepare
from pipeline.split import SplitSpec


def repetitive_corpus(path, n=3000, seed=7):
    """Like a software-help corpus: many short strings ("Cancel", "OK") repeated verbatim, some differing only in
    case or spacing, and repeated sources with another translation."""
    rng = random.Random(seed)
    common = [(f"Knopf {i}", f"button {i}") for i in range(150)]
    lines = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.5:
            src, tgt = rng.choice(common)
            if rng.random() < 0.2:
                src = src.upper().replace(" ", "  ")  # the same sentence to a reader
            if rng.random() < 0.1:
                tgt = tgt + " (alt)"
        else:
            src, tgt = f"Satz Nummer {i}", f"sentence number {i}"
        lines.append(f"{src}\t{tgt}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return lines


def key(text: str) -> str:
    return " ".join(text.casefold().split())


def test_repeats_never_straddle_splits_and_are_counted(tmp_path):
    lines = repetitive_corpus(tmp_path / "help.tsv")
    out = tmp_path / "prepared"
    result = prepare(CorpusSpec(path=str(tmp_path / "help.tsv")), SplitSpec(valid_fraction=0.1, test_fraction=0.2),
                     out)
    where_source, where_pair = {}, {}
    for name in SPLITS:
        table = pq.read_table(out / f"{name}.parquet")
        for src, tgt in zip(table["source"].to_pylist(), table["target"].to_pylist(), strict=True):
            where_source.setdefault(key(src), set()).add(name)
            where_pair.setdefault((src, tgt), set()).add(name)
    assert all(len(names) == 1 for names in where_source.values())
    assert all(len(names) == 1 for names in where_pair.values())
    assert result.counts["test"] > 300 and result.counts["valid"] > 100  # repeats did not collapse the split
    # The counts, from the written lines by an independent count.
    pairs = [tuple(line.rstrip("\n").split("\t")) for line in lines]
    sources = Counter(key(s) for s, _ in pairs)
    pair_counts = Counter((key(s), key(t)) for s, t in pairs)
    expected = {"sources": sum(c - 1 for c in sources.values()), "pairs": sum(c - 1 for c in pair_counts.values())}
    report = json.loads((out / "prepare.json").read_text())
    assert {k: report["duplicates"][k] for k in expected} == expected == {k: result.duplicates[k] for k in expected}


@pytest.mark.parametrize("problem", ["missing", "nothing_usable"])
def test_refused_corpus_leaves_no_output_folder(tmp_path, problem):
    path = tmp_path / "c.tsv"
    if problem == "nothing_usable":
        path.write_text("nur eine Spalte\n\tnur Ziel\n", encoding="utf-8")
    out = tmp_path / "deep" / "prepared"
    with pytest.raises(CorpusError if problem == "missing" else InputError):
        prepare(CorpusSpec(path=str(path)), SplitSpec(), out)
    assert not (tmp_path / "deep").exists()
