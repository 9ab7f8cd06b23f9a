"""Deterministic train/valid/test split by example id *and content*, so test pairs are never trained on.

Each id maps to a group key (the whole id, or part of it picked by ``group_pattern``). Rows whose
normalised sources are equal (NFKC, case-folded, whitespace collapsed) are joined into one group with
everything their group keys hold (union-find), so a repeated sentence — and a fortiori a repeated pair
— lands in one split, whatever its ids. A group's key (its smallest group key) is hashed with BLAKE2b
together with a salt, and the hash, read as a uniform number ``u`` in [0, 1), decides:
``u < test_fraction`` is test, ``u < test_fraction + valid_fraction`` is valid, else train. Without
repeated sources, the answer depends on nothing but (salt, group key): not on row order, corpus size or
machine, and a group (e.g. a Bible chapter) never straddles two splits.
"""

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")


class SplitSpec(BaseModel):
    """How to split; the same spec always gives the same split."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    valid_fraction: float = Field(default=0.03, ge=0.0, le=1.0)  # expected share of groups
    test_fraction: float = Field(default=0.05, ge=0.0, le=1.0)  # expected share of groups
    # Regex searched in the id; its first capture group (or whole match) is the group key, so that
    # related examples go to one split. Ids it does not match are their own group.
    group_pattern: str | None = None
    salt: str = "distillery"  # change it to draw a different, equally deterministic split

    @field_validator("group_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"group_pattern {pattern!r} is not a valid regex: {e}") from e
        return pattern

    @model_validator(mode="after")
    def _fractions_fit(self) -> "SplitSpec":
        if self.valid_fraction + self.test_fraction > 1.0:
            raise ValueError("valid_fraction + test_fraction must not exceed 1")
        return self


def group_key(example_id: str, pattern: re.Pattern[str] | None) -> str:
    """The part of an id that decides its split (the whole id without a pattern or match)."""
    match = pattern.search(example_id) if pattern is not None else None
    if match is None:
        return example_id
    return match.group(1) if pattern.groups else match.group(0)


def _split_of_key(key: str, spec: SplitSpec) -> Split:
    # A NUL between salt and key keeps ("ab", "c") and ("a", "bc") apart.
    digest = hashlib.blake2b(f"{spec.salt}\0{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if u < spec.test_fraction:
        return "test"
    return "valid" if u < spec.test_fraction + spec.valid_fraction else "train"


def split_of(example_id: str, spec: SplitSpec) -> Split:
    """Which split an example belongs to when its source is not shared with another group.

    Args:
        example_id: The example's stable id (the corpus ``id`` column).
        spec: Fractions, grouping and salt.

    Returns:
        "train", "valid" or "test".
    """
    pattern = re.compile(spec.group_pattern) if spec.group_pattern else None
    return _split_of_key(group_key(example_id, pattern), spec)


def normalise(text: str) -> str:
    """What counts as the same sentence: NFKC, case-folded, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while (up := self.parent.setdefault(root, root)) != root:
            root = up
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller key represents: independent of row order


@dataclass(frozen=True)
class SplitResult:
    parts: dict[Split, pa.Table]
    duplicate_pairs: int  # rows whose normalised (source, target) appeared in an earlier row
    duplicate_sources: int  # rows whose normalised source appeared in an earlier row (pairs included)
    merged_groups: int  # id groups joined to another one because they share a source


def split_corpus(table: pa.Table, spec: SplitSpec) -> SplitResult:
    """Split a table by id groups joined over equal sources, keeping row order within each split.

    Args:
        table: A table with a string ``id`` column and, to group by content, a ``source`` column (e.g. from
            ``read_corpus``; ``target`` is only counted).
        spec: Fractions, grouping and salt.

    Returns:
        The three splits (every row in exactly one, a split may be empty) and the duplicate counts.
    """
    pattern = re.compile(spec.group_pattern) if spec.group_pattern else None
    keys = [group_key(example_id, pattern) for example_id in table.column("id").to_pylist()]
    groups = _UnionFind()
    dup_pairs = dup_sources = 0
    if "source" in table.column_names:
        sources = [normalise(s) for s in table.column("source").to_pylist()]
        targets = ([normalise(s) for s in table.column("target").to_pylist()] if "target" in table.column_names
                   else [""] * len(sources))
        first_key: dict[str, str] = {}
        seen_pairs: set[tuple[str, str]] = set()
        for key, source, target in zip(keys, sources, targets, strict=True):
            if source in first_key:
                dup_sources += 1
                dup_pairs += (source, target) in seen_pairs
                groups.union("g\0" + key, "g\0" + first_key[source])
            else:
                first_key[source] = key
            seen_pairs.add((source, target))
    memo: dict[str, Split] = {}  # one hash per group, not per row
    names = []
    for key in keys:
        root = groups.find("g\0" + key)[2:]
        if (name := memo.get(root)) is None:
            name = memo[root] = _split_of_key(root, spec)
        names.append(name)
    merged = sum(1 for key in set(keys) if groups.find("g\0" + key)[2:] != key)
    labels = pa.array(names, pa.string())
    parts = {name: table.filter(pc.equal(labels, name)) for name in SPLITS}
    return SplitResult(parts, dup_pairs, dup_sources, merged)


def split_table(table: pa.Table, spec: SplitSpec) -> dict[Split, pa.Table]:
    """The three splits of ``split_corpus`` (see there)."""
    return split_corpus(table, spec).parts
