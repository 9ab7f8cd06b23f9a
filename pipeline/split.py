"""Deterministic train/valid/test split by example id, so test examples are never trained on.

Each id maps to a group key (the whole id, or part of it picked by ``group_pattern``), the key is
hashed with BLAKE2b together with a salt, and the hash, read as a uniform number ``u`` in [0, 1),
decides: ``u < test_fraction`` is test, ``u < test_fraction + valid_fraction`` is valid, else
train. The answer depends on nothing but (salt, key): not on row order, corpus size or machine, and
a group (e.g. a Bible chapter) never straddles two splits.
"""

import hashlib
import re
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
    """Which split an example belongs to.

    Args:
        example_id: The example's stable id (the corpus ``id`` column).
        spec: Fractions, grouping and salt.

    Returns:
        "train", "valid" or "test".
    """
    pattern = re.compile(spec.group_pattern) if spec.group_pattern else None
    return _split_of_key(group_key(example_id, pattern), spec)


def split_table(table: pa.Table, spec: SplitSpec) -> dict[Split, pa.Table]:
    """Split a table by its ``id`` column, keeping row order within each split.

    Args:
        table: Any table with a string ``id`` column (e.g. from ``read_corpus``).
        spec: Fractions, grouping and salt.

    Returns:
        ``{"train": ..., "valid": ..., "test": ...}``; every row lands in exactly one, and a split
        may be empty.
    """
    pattern = re.compile(spec.group_pattern) if spec.group_pattern else None
    memo: dict[str, Split] = {}  # one hash per group, not per row
    names = []
    for example_id in table.column("id").to_pylist():
        key = group_key(example_id, pattern)
        if (name := memo.get(key)) is None:
            name = memo[key] = _split_of_key(key, spec)
        names.append(name)
    labels = pa.array(names, pa.string())
    return {name: table.filter(pc.equal(labels, name)) for name in SPLITS}
