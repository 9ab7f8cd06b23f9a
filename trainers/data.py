"""The shard reader: the only training-side code that knows what shard columns mean.

A distilled dataset (``pipeline.run``) is opened through its manifest, which is checked first: the schema
version must be one this code reads, and the student's tokenizer must have the teacher's vocabulary (same
hash) — otherwise token-level KD would silently train on garbage ids.

Nothing loads the whole dataset. Opening it reads the manifest and, one Parquet row group at a time, only the
length columns: what a worker keeps for the whole corpus is two int32 per row. Batches are planned
**globally** from those lengths — the same list of batches, in the same order, on every worker, as a pure
function of (seed, epoch) — and each of ``world_size`` workers takes its own slice of every batch, fetching
its rows from the row groups they sit in (decoded to flat numpy arrays, no Python object per token, through
an LRU cache bounded in rows). The plan shuffles within windows of whole row groups, so a worker holds one
window at a time: its memory is bounded by the window, not the corpus. No example is seen by two workers in
a step, every worker knows the global token count of the step without communicating, and a run on N
workers follows the same batches as a run on one.

The ``nll`` baseline may instead read a prepared corpus (``ReferenceCorpus``): the same rows, without top-k.
Rows longer than the student's ``max_positions`` are skipped and counted, whichever the source.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import schema
from pipeline.dataset import MANIFEST, DatasetFileError, Manifest, check_name
from pipeline.storage import Store
from pipeline.tokenizer import Tokenizer
from trainers.batching import windowed_token_batches


class DatasetError(ValueError):
    """A distilled dataset is missing, incomplete, of another schema version, or of another vocabulary."""


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A ``list<T>`` or ``list<fixed_size_list<T, k>>`` column → (flat T values, row offsets [rows + 1]).

    For fixed-size lists the offsets count positions, not scalars (reshape the values to ``[-1, k]``).
    """
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten()  # respects slicing, unlike .values
    if pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False), offsets - offsets[0]


@dataclass
class Rows:
    """Training rows in flat form. Per row *i*: ``src[src_off[i]:src_off[i+1]]`` etc."""

    src: np.ndarray
    src_off: np.ndarray
    hyp: np.ndarray  # target ids the student is trained on (reference or teacher hypothesis)
    hyp_off: np.ndarray
    topk_ids: np.ndarray  # [positions, k]
    topk_logprobs: np.ndarray  # [positions, k] float16
    tail: np.ndarray  # [positions]
    score: np.ndarray  # [rows]
    rank: np.ndarray  # [rows]

    def __len__(self) -> int:
        return len(self.score)

    @property
    def lengths(self) -> np.ndarray:
        """Per-row cost for batching: the longer of source and target."""
        return np.maximum(np.diff(self.src_off), np.diff(self.hyp_off))

    @property
    def target_tokens(self) -> np.ndarray:
        return np.diff(self.hyp_off)

    def take(self, idx: np.ndarray) -> Rows:
        """The rows ``idx``, in that order, as compact ``Rows`` of their own."""
        idx = np.asarray(idx, dtype=np.int64)
        src_pos, src_off = _positions(self.src_off, idx)
        hyp_pos, hyp_off = _positions(self.hyp_off, idx)
        return Rows(src=self.src[src_pos], src_off=src_off, hyp=self.hyp[hyp_pos], hyp_off=hyp_off,
                    topk_ids=self.topk_ids[hyp_pos], topk_logprobs=self.topk_logprobs[hyp_pos],
                    tail=self.tail[hyp_pos], score=self.score[idx], rank=self.rank[idx])


def _positions(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of rows ``idx`` under ``offsets``, and the offsets of those rows laid end to end."""
    lengths = offsets[idx + 1] - offsets[idx]
    new = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.repeat(offsets[idx] - new[:-1], lengths) + np.arange(new[-1]), new


def _concat(parts: list[Rows]) -> Rows:
    """``parts`` laid end to end as one ``Rows``."""
    if len(parts) == 1:
        return parts[0]

    def offsets(name: str) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.concatenate([np.diff(getattr(p, name)) for p in parts]))])

    return Rows(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in
                   ("src", "hyp", "topk_ids", "topk_logprobs", "tail", "score", "rank")},
                src_off=offsets("src_off"), hyp_off=offsets("hyp_off"))


DEFAULT_WINDOW = 50_000  # rows a worker holds decoded at most (the shuffle window of the batch plan)


class TrainingRows:
    """What a student trains on, read by row group: per-row lengths for the plan, rows fetched on demand.

    Only two int32 per kept row (source and target length) are held for the whole corpus; row contents are
    decoded a row group at a time into a bounded cache (``window`` rows), and the plan
    (``trainers.batching.windowed_token_batches``) keeps every batch inside one window of row groups.
    Subclasses set ``src_len``, ``hyp_len``, ``groups`` (kept rows per row group, in order),
    ``skipped_too_long`` and ``window``, and decode a group in ``_decode``.
    """

    src_len: np.ndarray
    hyp_len: np.ndarray
    groups: np.ndarray
    skipped_too_long: int = 0
    window: int = DEFAULT_WINDOW

    def _decode(self, group: int) -> Rows:
        raise NotImplementedError

    def _index(self) -> None:
        """Row-group starts and the cache; call once ``groups`` is set."""
        self._starts = np.concatenate([[0], np.cumsum(self.groups)]).astype(np.int64)
        self._cache: OrderedDict[int, Rows] = OrderedDict()
        self._cached_rows = 0

    def __len__(self) -> int:
        return len(self.hyp_len)

    @property
    def lengths(self) -> np.ndarray:
        """Per-row cost for batching: the longer of source and target."""
        return np.maximum(self.src_len, self.hyp_len)

    @property
    def target_tokens(self) -> np.ndarray:
        return self.hyp_len

    @property
    def rows(self) -> Rows:
        """Every row, decoded: the whole corpus in memory (for tests and small tools; training uses ``fetch``)."""
        return _concat([self._decode(g) for g in range(len(self.groups))])

    def plan(self, *, max_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
        """The global batch plan of an epoch: row indices per batch, identical on every worker."""
        return windowed_token_batches(self.lengths, self.groups, window=self.window, max_tokens=max_tokens,
                                      seed=seed, epoch=epoch)

    def fetch(self, idx: np.ndarray) -> Rows:
        """The rows ``idx`` (indices of the plan), in that order, decoding the row groups they sit in as needed."""
        idx = np.asarray(idx, dtype=np.int64)
        group_of = np.searchsorted(self._starts, idx, side="right") - 1
        parts, order = [], []
        for g in np.unique(group_of):
            sel = np.flatnonzero(group_of == g)
            parts.append(self._group(int(g)).take(idx[sel] - self._starts[g]))
            order.append(sel)
        inverse = np.empty(len(idx), dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(len(idx))
        return _concat(parts).take(inverse)

    def _group(self, g: int) -> Rows:
        """Row group ``g`` decoded, through an LRU cache of at most ``window`` rows (or one larger group)."""
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        while self._cache and self._cached_rows + self.groups[g] > self.window:  # evict first: peak = window
            self._cached_rows -= len(self._cache.popitem(last=False)[1])
        rows = self._decode(g)
        self._cache[g] = rows
        self._cached_rows += len(rows)
        return rows


class DistilledDataset(TrainingRows):
    """A distilled dataset in a store, checked against its manifest and the student's tokenizer, read by row group."""

    def __init__(self, store_uri: str, name: str, *, tokenizer: Tokenizer, endpoint: str | None = None,
                 max_rank: int | None = None, max_positions: int | None = None, window: int = DEFAULT_WINDOW):
        """
        Args:
            store_uri: local directory or ``s3://bucket/prefix`` holding datasets.
            name: dataset name (a directory of the store).
            tokenizer: the student's tokenizer; its vocabulary hash must equal the teacher's.
            max_rank: keep hypotheses with ``hyp_rank < max_rank`` (e.g. 1 = 1-best only).
            max_positions: the student's longest sequence; longer rows are skipped and counted in
                ``skipped_too_long``.
            window: rows held decoded at most, and the plan's shuffle window.

        Raises:
            DatasetError: also when a shard disagrees with the manifest, or every row is longer than
                ``max_positions``.
        """
        try:
            self.name = check_name(name)
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
        self.store = Store.from_uri(store_uri, endpoint_override=endpoint)
        try:
            manifest = Manifest.read(self.store, name)
        except DatasetFileError as exc:
            raise DatasetError(f"dataset {name!r} in {store_uri}: {exc}") from None
        if manifest is None:
            raise DatasetError(f"no complete dataset {name!r} in {store_uri} (no {MANIFEST}: did the job finish?)")
        self.manifest = manifest
        if manifest.schema_version != schema.SCHEMA_VERSION:
            raise DatasetError(f"dataset {name!r} has shard schema version {manifest.schema_version}; "
                               f"this trainer reads version {schema.SCHEMA_VERSION}")
        theirs = manifest.tokenizer.vocab_hash
        if theirs != tokenizer.vocab_hash:
            raise DatasetError(f"student tokenizer {tokenizer.path} ({tokenizer.vocab_hash[:19]}…) does not match the "
                               f"teacher vocabulary of {name!r} ({theirs[:19]}…): token-level KD needs the same one")
        self.top_k = manifest.top_k
        self.max_rank = max_rank
        self.max_positions = max_positions
        self.window = window
        self._scan()

    def _scan(self) -> None:
        """Reads the length columns only, one row group at a time: the kept rows' lengths and where they sit."""
        self._where: list[tuple[str, int]] = []  # (shard path, row group) per group
        src_len, hyp_len, groups, self.skipped_too_long = [], [], [], 0
        for shard in self.manifest.shards:
            path = f"{self.name}/{shard.name}"
            with self.store.open_input(path) as f:
                parquet = pq.ParquetFile(f)
                if parquet.metadata.num_rows != shard.rows:
                    raise DatasetError(f"{self.store.join(path)} holds {parquet.metadata.num_rows} rows; the "
                                       f"manifest of {self.name!r} says {shard.rows} (was the shard replaced?)")
                for i in range(parquet.num_row_groups):
                    table = parquet.read_row_group(i, columns=["source_ids", "hyp_ids", "hyp_rank"])
                    keep, too_long = self._keep(table)
                    self.skipped_too_long += too_long
                    src_len.append(pc.list_value_length(table["source_ids"]).to_numpy()[keep].astype(np.int32))
                    hyp_len.append(pc.list_value_length(table["hyp_ids"]).to_numpy()[keep].astype(np.int32))
                    groups.append(int(keep.sum()))
                    self._where.append((path, i))
        self.src_len = np.concatenate(src_len) if src_len else np.zeros(0, np.int32)
        self.hyp_len = np.concatenate(hyp_len) if hyp_len else np.zeros(0, np.int32)
        self.groups = np.asarray(groups, dtype=np.int64)
        if self.max_positions is not None and len(self) == 0 and self.skipped_too_long:
            raise DatasetError(f"every row of dataset {self.name!r} is longer than the student's max_positions "
                               f"({self.max_positions})")
        self._index()

    def _keep(self, table: pa.Table) -> tuple[np.ndarray, int]:
        """Which rows of ``table`` are trained on (``max_rank``, ``max_positions``), and how many were too long.

        A Marian model has a position embedding per position up to ``max_positions``: a longer row cannot be
        trained on. Skipping it (rather than cutting it) keeps every kept row's target the translation of its
        source, and the teacher's top-k along it exact.
        """
        keep = np.ones(table.num_rows, dtype=bool)
        if self.max_rank is not None:
            keep &= table["hyp_rank"].to_numpy() < self.max_rank
        if self.max_positions is None:
            return keep, 0
        fits = ((pc.list_value_length(table["source_ids"]).to_numpy() <= self.max_positions)
                & (pc.list_value_length(table["hyp_ids"]).to_numpy() <= self.max_positions))
        return keep & fits, int((keep & ~fits).sum())

    def _decode(self, group: int) -> Rows:
        path, i = self._where[group]
        with self.store.open_input(path) as f:
            table = pq.ParquetFile(f).read_row_group(i, columns=COLUMNS)
        keep, _ = self._keep(table)
        if int(keep.sum()) != self.groups[group]:
            raise DatasetError(f"{self.store.join(path)} changed while training (row group {i})")
        return _rows(table.filter(keep), self.top_k)


COLUMNS = ["source_ids", "hyp_ids", "topk_ids", "topk_logprobs", "tail_logprob", "score", "hyp_rank"]


class ReferenceCorpus(TrainingRows):
    """A prepared corpus (``data prepare``'s train Parquet: ``source``/``target`` text) as training rows.

    The ``nll`` baseline trains on references only, so it needs no distilled dataset: the texts are tokenized
    with the student's tokenizer (as the teacher-forcing job tokenizes them) and become the same ``Rows``,
    with no top-k (``k = 0``), so batching, collation and the length rule are those of a distilled dataset.
    Unlike a distilled dataset, its tokenized rows are held in memory (one row group).
    """

    def __init__(self, path: str | Path, *, tokenizer: Tokenizer, max_positions: int | None = None):
        """
        Args:
            path: Parquet file with ``source`` and ``target`` columns.
            tokenizer: the student's tokenizer.
            max_positions: as for ``DistilledDataset``.
        """
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"corpus not found: {path}")
        try:
            text = pq.read_table(path, columns=["source", "target"])
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"{path} is not a Parquet file with source and target columns: {exc}") from None
        if text.num_rows == 0:
            raise DatasetError(f"corpus {path} holds no pairs")
        ids = pa.list_(pa.int32())
        table = pa.table({"source_ids": pa.array(tokenizer.encode_source(text["source"].to_pylist()), ids),
                          "hyp_ids": pa.array(tokenizer.encode_target(text["target"].to_pylist()), ids)})
        table, self.skipped_too_long = _drop_long(table, max_positions, str(path))
        self._all = _rows(table, 0)
        self.src_len, self.hyp_len = np.diff(self._all.src_off), np.diff(self._all.hyp_off)
        self.groups = np.array([len(self._all)])
        self.window = max(DEFAULT_WINDOW, len(self._all))  # in memory already: one window
        self._index()

    def _decode(self, group: int) -> Rows:
        return self._all


def _drop_long(table: pa.Table, max_positions: int | None, what: str) -> tuple[pa.Table, int]:
    """``table`` without the rows whose source or target ids exceed ``max_positions``, and how many those were."""
    if max_positions is None or table.num_rows == 0:
        return table, 0
    fits = pc.and_(pc.less_equal(pc.list_value_length(table["source_ids"]), max_positions),
                   pc.less_equal(pc.list_value_length(table["hyp_ids"]), max_positions))
    kept = table.filter(fits)
    if kept.num_rows == 0:
        raise DatasetError(f"every row of {what} is longer than the student's max_positions ({max_positions})")
    return kept, table.num_rows - kept.num_rows


def _rows(table: pa.Table, k: int) -> Rows:
    """A table of shard columns → ``Rows``; without top-k columns (``k = 0``) their arrays are empty."""
    src, src_off = _flat(table["source_ids"])
    hyp, hyp_off = _flat(table["hyp_ids"])
    positions, n = len(hyp), table.num_rows
    if k == 0:
        topk_ids, topk_lp = np.zeros((positions, 0), np.int32), np.zeros((positions, 0), np.float16)
        tail, score, rank = np.zeros(positions, np.float16), np.zeros(n, np.float32), np.zeros(n, np.int16)
    else:
        ids_inner, _ = _flat(table["topk_ids"])
        lp_inner, _ = _flat(table["topk_logprobs"])
        tail, _ = _flat(table["tail_logprob"])
        topk_ids, topk_lp = np.asarray(ids_inner).reshape(-1, k), np.asarray(lp_inner).reshape(-1, k)
        score, rank = table["score"].to_numpy(), table["hyp_rank"].to_numpy()
    return Rows(src=src.astype(np.int64), src_off=src_off, hyp=hyp.astype(np.int64), hyp_off=hyp_off,
                topk_ids=topk_ids, topk_logprobs=topk_lp, tail=np.asarray(tail), score=score, rank=rank)


def collate(rows: Rows, idx: np.ndarray, *, pad_id: int, global_tokens: int) -> dict[str, torch.Tensor]:
    """Padded tensors for the rows ``idx``.

    Returns:
        ``input_ids``/``attention_mask`` ``[B, S]``; ``decoder_input_ids``/``decoder_attention_mask``/``labels``
        ``[B, T]`` (labels ``IGNORE`` on padding); ``topk_ids`` ``[B, T, k]`` int64, ``topk_logprobs``
        ``[B, T, k]`` float32, ``tail_logprob`` ``[B, T]``; ``score``/``hyp_rank`` ``[B]``; ``global_tokens``
        (the step's target tokens over all workers, for loss normalisation).
    """
    from trainers.batching import seq2seq_batch

    srcs = [rows.src[rows.src_off[i]:rows.src_off[i + 1]] for i in idx]
    hyps = [rows.hyp[rows.hyp_off[i]:rows.hyp_off[i + 1]] for i in idx]
    batch = seq2seq_batch(srcs, hyps, pad_id=pad_id)
    B, T = batch["labels"].shape
    k = rows.topk_ids.shape[1]
    topk_ids = torch.zeros((B, T, k), dtype=torch.long)
    topk_lp = torch.zeros((B, T, k), dtype=torch.float32)
    tail = torch.zeros((B, T), dtype=torch.float32)
    for b, i in enumerate(idx):
        lo, hi = rows.hyp_off[i], rows.hyp_off[i + 1]
        topk_ids[b, : hi - lo] = torch.from_numpy(rows.topk_ids[lo:hi].astype(np.int64))
        topk_lp[b, : hi - lo] = torch.from_numpy(rows.topk_logprobs[lo:hi].astype(np.float32))
        tail[b, : hi - lo] = torch.from_numpy(rows.tail[lo:hi].astype(np.float32))
    batch.update(topk_ids=topk_ids, topk_logprobs=topk_lp, tail_logprob=tail,
                 score=torch.from_numpy(rows.score[idx].astype(np.float32)),
                 hyp_rank=torch.from_numpy(rows.rank[idx].astype(np.int64)),
                 global_tokens=torch.tensor(global_tokens))
    return batch


def worker_slice(batch_idx: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This worker's part of a global batch (strided, so lengths stay balanced across workers)."""
    return batch_idx[rank::world_size]
