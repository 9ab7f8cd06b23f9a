"""Distillation jobs on a real local Ray with a real CTranslate2 teacher: shards, manifest, resume, faults."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pytest
import yaml

from pipeline import schema
from pipeline.dataset import DatasetFileError, Progress, Sidecar
from pipeline.run import JobError, run_job
from pipeline.spec import JobSpec
from tests.conftest import make_bucket

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tiny_data, tmp_path_factory) -> Path:
    """60 good TSV lines plus 3 bad ones (empty target, malformed, invalid UTF-8)."""
    import pyarrow.parquet as pq

    table = pq.read_table(tiny_data / "train.parquet").slice(0, 60)
    pairs = zip(table["source"].to_pylist(), table["target"].to_pylist(), strict=True)
    lines = [f"{s}\t{t}".encode() for s, t in pairs]
    lines[10:10] = [b"Ein Satz ohne Ziel\t", b"keine Spalten", b"kaputt \xff\xfe\tbroken"]
    path = tmp_path_factory.mktemp("corpus") / "corpus.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def make_spec(corpus, teacher, store, dataset="ds", **overrides) -> JobSpec:
    data = {
        "corpus": {"path": str(corpus)},
        "teacher": {"model": str(teacher), "compute_type": "int8"},
        "targets": {"top_k": 4},
        "output": {"store": str(store), "dataset": dataset, "shard_size": 25},
        "resources": {"workers": 1, "threads_per_worker": 1},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return JobSpec.model_validate(data)


def read_dataset(store: Path, dataset: str):
    return pads.dataset(str(store / dataset), format="parquet").to_table()


def test_job_writes_shards_manifest_and_rejects(ray_local, corpus, tiny_teacher, tiny_tokenizer, tmp_path):
    updates = []
    manifest = run_job(make_spec(corpus, tiny_teacher["ct2_int8"], tmp_path), on_progress=updates.append)
    ds = tmp_path / "ds"
    # The file holds the documented JSON field names (README, "Manifest and progress files").
    on_disk = json.loads((ds / "_manifest.json").read_text())
    assert on_disk == manifest.model_dump(mode="json")
    assert on_disk["manifest_version"] == 1 and on_disk["counts"]["examples"] == 60
    assert manifest.counts.examples == 60 and manifest.counts.records_read == 63
    assert manifest.counts.rejected == {"empty_target": 1, "malformed": 1, "invalid_utf8": 1}
    assert len((ds / "_rejects.jsonl").read_text().splitlines()) == 3
    assert [s.examples for s in manifest.shards] == [25, 25, 10]
    assert [s.name for s in manifest.shards] == sorted(p.name for p in ds.glob("part-*.parquet"))
    assert manifest.tokenizer.vocab_hash == tiny_tokenizer.vocab_hash
    assert manifest.teacher.hash.startswith("sha256:") and manifest.schema_version == schema.SCHEMA_VERSION
    assert on_disk["teacher"]["device"] == "cpu"  # the default teacher.device, recorded as resolved

    table = read_dataset(tmp_path, "ds")  # pyarrow.dataset opens the directory of shards as is
    assert schema.validate(table, top_k=4, vocab_size=len(tiny_tokenizer.tokens)) == []
    assert table.num_rows == 60 and len(set(table["id"].to_pylist())) == 60
    assert sorted(table["index"].to_pylist()) == table["index"].to_pylist()
    positions = sum(len(x) for x in table["hyp_ids"].to_pylist())
    assert manifest.counts.target_tokens == positions
    # DuckDB reads the same files, nested fixed-size lists included.
    [(n, first_k)] = duckdb.sql(
        f"select count(*), max(len(topk_ids[1])) from read_parquet('{ds}/part-*.parquet')").fetchall()
    assert (n, first_k) == (60, 4)
    progress = json.loads((ds / "_progress.json").read_text())
    assert progress["progress_version"] == 1 and progress["state"] == "succeeded"
    assert progress["shards_done"] == progress["shards_total"] == 3
    assert Progress.parse((ds / "_progress.json").read_bytes()) == updates[-1]
    assert [u.shards_done for u in updates][-1] == 3 and updates[-1].examples_done == 60
    # Each sidecar names the Ray node that wrote it (here the one local node); the manifest does not.
    import ray

    sidecars = [Sidecar.model_validate_json((ds / f"_part-{s.shard:05d}.json").read_text()) for s in manifest.shards]
    assert {s.node_id for s in sidecars} == {ray.get_runtime_context().get_node_id()}
    assert all("node_id" not in s for s in on_disk["shards"])


def test_teacher_forcing_honours_max_length_and_counts_the_cut_rows(ray_local, corpus, tiny_teacher,
                                                                     tiny_tokenizer, tmp_path):
    manifest = run_job(make_spec(corpus, tiny_teacher["ct2_int8"], tmp_path, decoding={"max_length": 10}))
    table = read_dataset(tmp_path, "ds")
    refs = table["target_ids"].to_pylist()
    assert table["hyp_ids"].to_pylist() == [r[:10] for r in refs]
    assert manifest.counts.cut_at_max_length == sum(len(r) > 10 for r in refs) > 0
    assert manifest.counts.target_tokens == sum(min(len(r), 10) for r in refs)


def test_rerun_skips_complete_shards_and_redoes_damaged_ones(ray_local, corpus, tiny_teacher, tmp_path):
    spec = make_spec(corpus, tiny_teacher["ct2_int8"], tmp_path)
    first = run_job(spec)
    ds = tmp_path / "ds"
    untouched = (ds / "part-00000.parquet").stat().st_mtime_ns
    (ds / "part-00001.parquet").write_bytes(b"half a shard")  # damaged: hash no longer matches
    (ds / "part-00002.parquet").unlink()  # missing
    (ds / "_manifest.json").unlink()
    second = run_job(spec)
    assert second.dataset_hash == first.dataset_hash
    assert (ds / "part-00000.parquet").stat().st_mtime_ns == untouched


def test_dataset_made_from_other_inputs_is_refused(ray_local, corpus, tiny_teacher, tmp_path):
    spec = make_spec(corpus, tiny_teacher["ct2_int8"], tmp_path)
    run_job(spec)
    other = make_spec(corpus, tiny_teacher["ct2_int8"], tmp_path, targets={"top_k": 5})
    with pytest.raises(JobError, match="other inputs"):
        run_job(other)
    # A _job.json written by a newer version is not guessed at: the same spec is refused, naming the version.
    job = json.loads((tmp_path / "ds" / "_job.json").read_text())
    (tmp_path / "ds" / "_job.json").write_text(json.dumps(job | {"job_version": 2}))
    with pytest.raises(DatasetFileError, match="job_version 2"):
        run_job(spec)


def test_killed_worker_is_retried_and_dataset_complete(ray_local, corpus, tiny_teacher, tmp_path):
    # Beam search up to 200 tokens (plus the forced pass) with an undertrained teacher keeps each shard busy
    # long enough for the kill to land mid-job even when the machine is loaded.
    spec = make_spec(corpus, tiny_teacher["ct2_int8"], tmp_path,
                     decoding={"mode": "beam", "beam_size": 4, "max_length": 200}, output={"shard_size": 6})
    reference = run_job(spec.model_copy(update={"output": spec.output.model_copy(update={"dataset": "ref"})}))
    ds, killed = tmp_path / "ds", []

    def kill_first_worker():
        while not (ds / "_part-00000.json").exists():
            time.sleep(0.05)
        pid = json.loads((ds / "_part-00000.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)  # mid-way through its next shard
        killed.append(pid)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    manifest = run_job(spec)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    pids = {json.loads((ds / f"_part-{s.shard:05d}.json").read_text())["pid"] for s in manifest.shards}
    # A restarted actor finished the job. Ray may hand the retried actor the killed one's shards again, so the
    # proof is a writer other than the killed process, not two writers.
    assert pids - set(killed), f"every shard written by the killed worker {killed}"
    assert manifest.counts.examples == 60
    assert manifest.dataset_hash == reference.dataset_hash


def write_spec(path: Path, spec: JobSpec) -> Path:
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True)))
    return path


def run_cli(spec_path: Path, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_killed_driver_rerun_gives_identical_dataset(corpus, tiny_teacher, tmp_path):
    spec = make_spec(corpus, tiny_teacher["ct2_int8"], tmp_path, decoding={"mode": "greedy", "max_length": 200},
                     output={"shard_size": 6})
    straight = run_cli(write_spec(tmp_path / "a.yaml", spec.model_copy(
        update={"output": spec.output.model_copy(update={"dataset": "straight"})})))
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    path = write_spec(tmp_path / "b.yaml", spec)
    proc = run_cli(path, start_new_session=True)
    while not (tmp_path / "ds" / "_part-00001.json").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray die mid-job
    proc.wait()
    assert not (tmp_path / "ds" / "_manifest.json").exists()
    again = run_cli(path)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    final = json.loads((tmp_path / "ds" / "_manifest.json").read_text())
    assert final["dataset_hash"] == json.loads((tmp_path / "straight" / "_manifest.json").read_text())["dataset_hash"]


@pytest.mark.parametrize("problem", ["missing_model", "tokenizer_mismatch", "empty_corpus", "bad_spec",
                                     "top_k_over_vocabulary", "compute_type_unsupported_here", "cuda_without_gpu",
                                     "language_token_not_in_vocabulary"])
def test_bad_input_is_a_clear_error_and_writes_nothing(problem, corpus, tiny_teacher, tmp_path):
    spec = make_spec(corpus, tiny_teacher["ct2_int8"], tmp_path)
    if problem == "top_k_over_vocabulary":  # ≤ 1024, so the spec alone cannot know
        spec.targets.top_k, message = 1000, "targets.top_k 1000 exceeds the teacher's vocabulary (599 tokens"
    elif problem == "compute_type_unsupported_here":
        import ctranslate2

        supported = ctranslate2.get_supported_compute_types("cpu")
        unsupported = [c for c in ("int16", "float16", "bfloat16") if c not in supported]
        if not unsupported:
            pytest.skip("this CPU supports every compute type")
        spec.teacher.compute_type, message = unsupported[0], f"compute type '{unsupported[0]}' is not supported"
    elif problem == "cuda_without_gpu":  # a valid cluster spec, run where there is no GPU (this machine)
        from pipeline.device import cuda_device_count

        if cuda_device_count() > 0:
            pytest.skip("this machine has a CUDA device")
        spec.teacher.device, spec.resources.gpus_per_worker = "cuda", 0.5
        message = "error: teacher.device is cuda but CTranslate2 sees no CUDA device on this machine"
    elif problem == "language_token_not_in_vocabulary":
        spec.teacher.target_prefix, message = ["__xx__"], "teacher.target_prefix '__xx__': not in the teacher's"
    elif problem == "missing_model":
        spec.teacher.model, message = str(tmp_path / "nowhere"), "teacher model directory not found"
    elif problem == "tokenizer_mismatch":
        from pipeline.tokenizer import train_tokenizer

        train_tokenizer(["völlig andere Wörter", "other words entirely"] * 40, tmp_path / "tok", vocab_size=50)
        spec.teacher.tokenizer, message = str(tmp_path / "tok"), "does not match teacher"
    elif problem == "empty_corpus":
        (tmp_path / "empty.tsv").write_text("nur eine Spalte\n\tnur Ziel\n")
        spec.corpus.path, message = str(tmp_path / "empty.tsv"), "empty corpus"
    path = write_spec(tmp_path / "spec.yaml", spec)
    if problem == "bad_spec":
        data = yaml.safe_load(path.read_text())
        data["decoding"] = {"mode": "greedy", "num_hypotheses": 3}
        data["bogus"] = 1
        path.write_text(yaml.safe_dump(data))
        message = "num_hypotheses must be 1"
    proc = run_cli(path)
    assert proc.wait(timeout=120) == 2
    stderr = proc.stderr.read()
    assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "ds").exists()  # no _job.json that would lock the name against a corrected spec


def test_s3_store(corpus, tiny_teacher, s3_endpoint, tmp_path):
    """The same job writes to a real S3-compatible server (moto) through pyarrow.fs."""
    import pyarrow.fs as pafs

    bucket = make_bucket(s3_endpoint)
    spec = make_spec(corpus, tiny_teacher["ct2_int8"], f"s3://{bucket}/datasets")
    spec.output.s3_endpoint = s3_endpoint
    proc = run_cli(write_spec(tmp_path / "s3.yaml", spec), env=os.environ.copy())
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                           region="us-east-1")
    with fs.open_input_stream(f"{bucket}/datasets/ds/_manifest.json") as f:
        manifest = json.loads(f.read())
    table = pads.dataset(f"{bucket}/datasets/ds", filesystem=fs, format="parquet").to_table()
    assert table.num_rows == manifest["counts"]["examples"] == 60
    assert schema.validate(table, top_k=4) == []
