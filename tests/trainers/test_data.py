"""The shard reader against the shards the pipeline wrote (read independently with pyarrow)."""

import json
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from trainers.batching import IGNORE
from trainers.data import DatasetError, DistilledDataset, collate, worker_slice

pytestmark = pytest.mark.slow


def test_rows_match_the_shards(tiny_distilled, tiny_tokenizer):
    data = DistilledDataset(tiny_distilled["store"], "beam", tokenizer=tiny_tokenizer)
    table = pads.dataset(f"{tiny_distilled['store']}/beam", format="parquet").to_table()
    assert len(data.rows) == table.num_rows == 2 * tiny_distilled["beam"].counts.examples
    first_best = DistilledDataset(tiny_distilled["store"], "beam", tokenizer=tiny_tokenizer, max_rank=1)
    assert len(first_best.rows) == table.num_rows // 2
    # row 7 through the reader == row 7 read directly
    row, r = table.slice(7, 1).to_pylist()[0], data.rows
    lo, hi = r.hyp_off[7], r.hyp_off[8]
    assert r.hyp[lo:hi].tolist() == row["hyp_ids"]
    assert r.src[r.src_off[7]:r.src_off[8]].tolist() == row["source_ids"]
    assert r.topk_ids[lo:hi].tolist() == row["topk_ids"]
    np.testing.assert_array_equal(r.topk_logprobs[lo:hi], np.array(row["topk_logprobs"], dtype=np.float16))


def test_collate_aligns_topk_with_labels(tiny_distilled, tiny_tokenizer):
    data = DistilledDataset(tiny_distilled["store"], "tf", tokenizer=tiny_tokenizer)
    table = pads.dataset(f"{tiny_distilled['store']}/tf", format="parquet").to_table()
    idx = np.array([3, 0, 9])
    batch = collate(data.rows, idx, pad_id=tiny_tokenizer.pad_id, global_tokens=123)
    B, T = batch["labels"].shape
    assert batch["topk_ids"].shape == (B, T, 8) and batch["tail_logprob"].shape == (B, T)
    for b, i in enumerate(idx):
        row = table.slice(int(i), 1).to_pylist()[0]  # read directly from the shard
        n = len(row["hyp_ids"])
        # position t: the label y_t and the teacher's distribution over y_t (read beside it in the shard)
        assert batch["labels"][b, :n].tolist() == row["hyp_ids"] and (batch["labels"][b, n:] == IGNORE).all()
        assert batch["topk_ids"][b, :n].tolist() == row["topk_ids"]
        np.testing.assert_allclose(batch["topk_logprobs"][b, :n].numpy(), np.array(row["topk_logprobs"], np.float32))
        np.testing.assert_allclose(batch["tail_logprob"][b, :n].numpy(), np.array(row["tail_logprob"], np.float32))
        assert (batch["topk_logprobs"][b, n:] == 0).all()  # padding stays zero
    assert int(batch["global_tokens"]) == 123


def test_collate_keeps_each_positions_top_k_beside_its_label():
    """Rows built so that position t's top-1 id is the label y_t and its log-probs and tail encode t: every
    collated position must carry its own entries (a one-position shift of top-k against labels breaks all)."""
    from trainers.data import Rows

    lengths = [3, 5, 1, 4]
    hyp = np.concatenate([np.arange(10 * r, 10 * r + n) for r, n in enumerate(lengths)])  # distinct labels
    hyp_off = np.concatenate([[0], np.cumsum(lengths)])
    position = np.concatenate([np.arange(n) for n in lengths])  # t within its row
    rows = Rows(src=np.ones(sum(lengths), np.int64), src_off=hyp_off, hyp=hyp, hyp_off=hyp_off,
                topk_ids=np.stack([hyp, hyp + 100], axis=1), topk_logprobs=-np.stack([position + 1.0, position + 2.0],
                                                                                     axis=1).astype(np.float16),
                tail=-(position + 3.0).astype(np.float32), score=np.zeros(len(lengths)), rank=np.zeros(len(lengths)))
    idx = np.array([2, 0, 3, 1])
    batch = collate(rows, idx, pad_id=999, global_tokens=0)
    for b, i in enumerate(idx):
        n = lengths[i]
        labels = batch["labels"][b, :n]
        assert labels.tolist() == list(range(10 * i, 10 * i + n)) and (batch["labels"][b, n:] == IGNORE).all()
        assert (batch["topk_ids"][b, :n, 0] == labels).all() and (batch["topk_ids"][b, :n, 1] == labels + 100).all()
        t = torch.arange(n, dtype=torch.float32)
        assert batch["topk_logprobs"][b, :n].tolist() == torch.stack([-(t + 1), -(t + 2)], dim=1).tolist()
        assert batch["tail_logprob"][b, :n].tolist() == (-(t + 3)).tolist()


def test_plan_is_global_and_worker_slices_partition_it(tiny_distilled, tiny_tokenizer):
    data = DistilledDataset(tiny_distilled["store"], "tf", tokenizer=tiny_tokenizer)
    plan = data.plan(max_tokens=800, seed=1, epoch=2)
    assert [b.tolist() for b in plan] == [b.tolist() for b in data.plan(max_tokens=800, seed=1, epoch=2)]
    assert sorted(np.concatenate(plan).tolist()) == list(range(len(data.rows)))
    for batch in plan[:10]:
        parts = [worker_slice(batch, r, 3) for r in range(3)]
        assert sorted(np.concatenate(parts).tolist()) == sorted(batch.tolist())


def test_vocabulary_mismatch_and_schema_version_are_refused(tiny_distilled, tiny_tokenizer, tmp_path):
    from pipeline.tokenizer import train_tokenizer

    other = train_tokenizer(["ganz andere Wörter", "other words"] * 30, tmp_path / "tok", vocab_size=40)
    with pytest.raises(DatasetError, match="does not match the teacher vocabulary"):
        DistilledDataset(tiny_distilled["store"], "tf", tokenizer=other)
    shutil.copytree(f"{tiny_distilled['store']}/tf", tmp_path / "store" / "old")
    manifest = json.loads((tmp_path / "store" / "old" / "_manifest.json").read_text())
    (tmp_path / "store" / "old" / "_manifest.json").write_text(json.dumps(manifest | {"schema_version": 99}))
    with pytest.raises(DatasetError, match="schema version 99"):
        DistilledDataset(str(tmp_path / "store"), "old", tokenizer=tiny_tokenizer)
    (tmp_path / "store" / "old" / "_manifest.json").write_text(json.dumps(manifest | {"manifest_version": 2}))
    with pytest.raises(DatasetError, match="manifest_version 2; this distillery reads version 1"):
        DistilledDataset(str(tmp_path / "store"), "old", tokenizer=tiny_tokenizer)
    with pytest.raises(DatasetError, match="no complete dataset"):
        DistilledDataset(str(tmp_path / "store"), "missing", tokenizer=tiny_tokenizer)
    (tmp_path / "store" / "old" / "_manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "store" / "old").rename(tmp_path / "store" / "old\n")  # a complete dataset under a bad name
    with pytest.raises(DatasetError, match="invalid dataset name"):
        DistilledDataset(str(tmp_path / "store"), "old\n", tokenizer=tiny_tokenizer)


def test_rows_longer_than_max_positions_are_skipped_and_counted(tiny_distilled, tiny_tokenizer):
    table = pads.dataset(f"{tiny_distilled['store']}/tf", format="parquet").to_table()
    src = [len(x) for x in table["source_ids"].to_pylist()]
    hyp = [len(x) for x in table["hyp_ids"].to_pylist()]
    limit = sorted(max(s, h) for s, h in zip(src, hyp, strict=True))[len(src) // 2]  # about half the rows fit
    fits = [max(s, h) <= limit for s, h in zip(src, hyp, strict=True)]
    data = DistilledDataset(tiny_distilled["store"], "tf", tokenizer=tiny_tokenizer, max_positions=limit)
    assert len(data.rows) == sum(fits) and data.skipped_too_long == len(fits) - sum(fits) > 0
    assert data.rows.lengths.max() <= limit
    first_kept = fits.index(True)
    assert data.rows.hyp[:data.rows.hyp_off[1]].tolist() == table["hyp_ids"][first_kept].as_py()
    with pytest.raises(DatasetError, match="longer than the student's max_positions"):
        DistilledDataset(tiny_distilled["store"], "tf", tokenizer=tiny_tokenizer, max_positions=2)


def test_reference_corpus_gives_the_rows_of_a_teacher_forcing_dataset(tiny_data, tiny_distilled, tiny_tokenizer):
    """The nll baseline's reader: a prepared corpus tokenized by the student's tokenizer gives the same source and
    target ids, in the same order, as the teacher-forcing job wrote for the same split."""
    from trainers.data import ReferenceCorpus

    corpus = ReferenceCorpus(tiny_data / "train.parquet", tokenizer=tiny_tokenizer)
    table = pads.dataset(f"{tiny_distilled['store']}/tf", format="parquet").to_table().sort_by("index")
    rows = corpus.rows
    assert len(rows) == table.num_rows and corpus.skipped_too_long == 0
    assert np.split(rows.src, rows.src_off[1:-1])[5].tolist() == table["source_ids"][5].as_py()
    assert rows.hyp.tolist() == [t for ids in table["hyp_ids"].to_pylist() for t in ids]
    assert rows.topk_ids.shape == (len(rows.hyp), 0)
    batch = collate(rows, np.array([2, 0]), pad_id=tiny_tokenizer.pad_id, global_tokens=1)
    assert batch["labels"][1, : rows.hyp_off[1]].tolist() == table["hyp_ids"][0].as_py()
    short = ReferenceCorpus(tiny_data / "train.parquet", tokenizer=tiny_tokenizer, max_positions=30)
    lengths = [max(len(s), len(t)) for s, t in zip(table["source_ids"].to_pylist(), table["hyp_ids"].to_pylist(),
                                                     strict=True)]
    assert short.skipped_too_long == sum(n > 30 for n in lengths) and len(short.rows) == sum(n <= 30 for n in lengths)
    with pytest.raises(DatasetError, match="corpus not found"):
        ReferenceCorpus(tiny_data / "nope.parquet", tokenizer=tiny_tokenizer)


def _repeated(store, name: str, times: int, tmp_path) -> str:
    """A dataset listing the shards of ``name`` ``times`` over (hard links), under its own manifest."""
    import os

    from pipeline.dataset import Manifest, shard_file
    from pipeline.storage import Store

    manifest = Manifest.read(Store.from_uri(store), name)
    out = tmp_path / "store"
    entries = []
    for copy in range(times):
        for entry in manifest.shards:
            i = copy * len(manifest.shards) + entry.shard
            (out / f"{name}x{times}").mkdir(parents=True, exist_ok=True)
            os.link(f"{store}/{name}/{entry.name}", out / f"{name}x{times}" / shard_file(i))
            entries.append(entry.model_copy(update={"name": shard_file(i), "shard": i}))
    (out / f"{name}x{times}" / "_manifest.json").write_text(
        manifest.model_copy(update={"dataset": f"{name}x{times}", "shards": entries}).model_dump_json())
    return str(out)


def test_fetch_gives_the_rows_of_a_whole_read_in_plan_order(tiny_distilled, tiny_tokenizer):
    """Rows fetched by row group, in any order and across shards, equal the same rows of one whole read."""
    table = pads.dataset(f"{tiny_distilled['store']}/beam", format="parquet").to_table()
    src, hyp = table["source_ids"].to_pylist(), table["hyp_ids"].to_pylist()
    limit = sorted(len(s) for s in src)[len(src) * 9 // 10]  # about a tenth of the sources is longer
    data = DistilledDataset(tiny_distilled["store"], "beam", tokenizer=tiny_tokenizer, max_rank=1,
                            max_positions=max(limit, max(len(h) for h in hyp)))
    limit = data.max_positions
    kept = [i for i in range(table.num_rows)  # the rule, restated: 1-best only, both sides within the limit
            if table["hyp_rank"][i].as_py() < 1 and len(src[i]) <= limit and len(hyp[i]) <= limit]
    assert 0 < len(kept) < table.num_rows // 2
    assert len(data) == len(kept) and len(data.groups) >= len(tiny_distilled["beam"].shards) > 1
    idx = np.array([len(kept) - 1, 0, 350, 3, 351, 699 if len(kept) > 699 else 5])
    rows = data.fetch(idx)
    for j, i in enumerate(idx):
        row = table.slice(kept[i], 1).to_pylist()[0]
        assert rows.src[rows.src_off[j]:rows.src_off[j + 1]].tolist() == row["source_ids"]
        assert rows.hyp[rows.hyp_off[j]:rows.hyp_off[j + 1]].tolist() == row["hyp_ids"]
        assert rows.topk_ids[rows.hyp_off[j]:rows.hyp_off[j + 1]].tolist() == row["topk_ids"]
        np.testing.assert_array_equal(rows.tail[rows.hyp_off[j]:rows.hyp_off[j + 1]],
                                      np.array(row["tail_logprob"], np.float16))
        assert rows.score[j] == np.float32(row["score"])
    assert data.target_tokens[idx].tolist() == [len(hyp[kept[i]]) for i in idx]


def test_a_window_bounds_the_rows_held_and_each_row_group_is_decoded_once(tiny_distilled, tiny_tokenizer, tmp_path):
    """With a window smaller than the dataset, the plan still covers every row once, is a pure function of
    (seed, epoch), holds at most a window decoded, and decodes each row group once per epoch."""
    store = _repeated(tiny_distilled["store"], "tf", 4, tmp_path)  # 12 row groups of ≤ 500 rows
    decoded = []

    class Counting(DistilledDataset):
        def _decode(self, group):
            decoded.append(group)
            return super()._decode(group)

    data = Counting(store, "tfx4", tokenizer=tiny_tokenizer, window=1000)
    plan = data.plan(max_tokens=800, seed=3, epoch=1)
    assert sorted(np.concatenate(plan).tolist()) == list(range(len(data)))
    assert [b.tolist() for b in plan] == [b.tolist() for b in data.plan(max_tokens=800, seed=3, epoch=1)]
    assert [b.tolist() for b in plan] != [b.tolist() for b in data.plan(max_tokens=800, seed=3, epoch=2)]
    held = 0
    for batch in plan:
        data.fetch(batch)
        assert data._cached_rows <= 1000
        held = max(held, data._cached_rows)
    # Once each: batches that mixed windows would make a cache of one window decode groups again.
    assert sorted(decoded) == list(range(len(data.groups))) and held > 500


def test_memory_grows_by_the_plan_alone_not_by_the_rows(tiny_distilled, tiny_tokenizer, tmp_path):
    """Collating batches over 10× the shards costs at most a few plan bytes per extra row; the old reader, which
    held every row, grew by the rows themselves (int64 ids alone: 8 bytes per token, ~500 bytes per row here).

    tracemalloc sees numpy's allocations (the int64 ids, the per-row lengths, the plan, every gathered batch),
    not Arrow's own buffers; bench/trainer_memory.py measures a worker's whole RSS."""
    import tracemalloc

    def peak(store, name) -> tuple[int, int]:
        tracemalloc.start()
        data = DistilledDataset(store, name, tokenizer=tiny_tokenizer, window=600)
        for batch in data.plan(max_tokens=800, seed=0, epoch=0)[:40]:
            collate(data.fetch(batch), np.arange(len(batch)), pad_id=0, global_tokens=1)
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size, len(data)

    (one, rows1), (ten, rows10) = (peak(_repeated(tiny_distilled["store"], "tf", n, tmp_path / str(n)), f"tfx{n}")
                                   for n in (1, 10))
    tokens_per_row = tiny_distilled["tf"].counts.target_tokens / tiny_distilled["tf"].counts.rows
    assert tokens_per_row * 8 > 200  # what each extra row cost the old reader, at the least
    assert (ten - one) / (rows10 - rows1) < 64, (one, ten)


def test_reads_a_dataset_from_s3(s3_endpoint, tiny_distilled, tiny_tokenizer):
    import pyarrow.fs as pafs

    from tests.conftest import make_bucket

    bucket = make_bucket(s3_endpoint)
    s3 = pafs.S3FileSystem(scheme="http", endpoint_override=s3_endpoint.removeprefix("http://"), region="us-east-1")
    pafs.copy_files(f"{tiny_distilled['store']}/tf", f"{bucket}/datasets/tf", destination_filesystem=s3)
    remote = DistilledDataset(f"s3://{bucket}/datasets", "tf", tokenizer=tiny_tokenizer, endpoint=s3_endpoint)
    local = DistilledDataset(tiny_distilled["store"], "tf", tokenizer=tiny_tokenizer)
    idx = np.array([5, 900, 17])
    a, b = remote.fetch(idx), local.fetch(idx)
    assert a.hyp.tolist() == b.hyp.tolist() and a.topk_ids.tolist() == b.topk_ids.tolist()
    assert remote.lengths.tolist() == local.lengths.tolist()
