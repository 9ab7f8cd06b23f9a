"""One exit-status policy for every command (pipeline.errors): 0 done, 2 invalid input, 1 failed mid-run, each
ending with `error: …` and never a traceback; eval's copy baseline and the weak-teacher warning."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from distillery.cli import app
from pipeline.ct2 import EVAL_RECORD, model_hash

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillery.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def invoke(*args: str):
    """In-process run (shares the session's Ray); returns (exit code, stdout + stderr)."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def write_spec(path: Path, corpus: Path, teacher: Path, store: Path, **sections) -> Path:
    spec = {"corpus": {"path": str(corpus), "id_column": "id"}, "teacher": {"model": str(teacher)},
            "targets": {"top_k": 4}, "output": {"store": str(store), "dataset": "ds", "shard_size": 50},
            "resources": {"workers": 1, "threads_per_worker": 1}} | sections
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("args, expected", [
    (["data", "prepare", "--corpus", "c.tsv"], "error: Missing option '--out'"),  # a usage error
    (["data", "prepare", "--out", "{tmp}/out", "--corpus", "{tmp}/missing.tsv"], "error: corpus file not found"),
    (["eval", "--model", "{tmp}/nowhere", "--test", "{tmp}/missing.tsv"], "error: teacher model directory not found"),
    (["distill", "{tmp}/missing.yaml"], "error: config file not found"),
    (["train", "{tmp}/missing.yaml"], "error: config file not found"),
])
def test_invalid_input_exits_2_with_error_and_no_traceback(tmp_path, args, expected):
    proc = cli(*(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr and "Error" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def teacher_copy(tiny_teacher, tmp_path) -> Path:
    """The tiny teacher in a directory of the test's own (an eval record or a damaged file stays there)."""
    return Path(shutil.copytree(tiny_teacher["ct2_int8"], tmp_path / "teacher"))


def test_refused_job_draws_no_progress_bar_and_leaves_nothing(teacher_copy, tiny_data, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", tiny_data / "valid.parquet", teacher_copy, tmp_path / "store",
                      targets={"top_k": 1000})
    code, output = invoke("distill", str(spec))
    assert code == 2 and "error: targets.top_k 1000 exceeds the teacher's vocabulary" in output
    assert "shards" not in output and "Traceback" not in output
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_failure_mid_run_exits_1_with_error_and_no_traceback(ray_local, teacher_copy, tiny_data, tmp_path, capfd):
    """A teacher whose weights are damaged passes every driver check (files, vocabulary) and fails in the workers:
    a failed run, for `distillery distill` and `python -m pipeline run` alike. The teacher also carries an eval
    record below its copy baseline: both commands warn about it before they start."""
    from pipeline.__main__ import main as pipeline_main

    (teacher_copy / "model.bin").write_bytes((teacher_copy / "model.bin").read_bytes()[:1000])
    (teacher_copy / EVAL_RECORD).write_text(json.dumps({"test": "t", "model": {"bleu": 0.4},
                                                        "copy_baseline": {"bleu": 4.95}}))
    spec = write_spec(tmp_path / "spec.yaml", tiny_data / "valid.parquet", teacher_copy, tmp_path / "store")
    code, output = invoke("distill", str(spec))
    assert code == 1, output
    assert "error: job failed: 2 of 2 shards failed" in output and "cannot load teacher" in output
    assert "warning: teacher" in output and "below copying the source (BLEU 4.95)" in output
    assert "Traceback" not in output
    assert not (tmp_path / "store" / "ds" / "_manifest.json").exists()

    capfd.readouterr()
    assert pipeline_main(["run", str(spec)]) == 1
    err = capfd.readouterr().err
    assert "error: job failed: 2 of 2 shards failed" in err and "warning: teacher" in err
    assert "Traceback" not in err


def test_eval_prints_and_records_the_copy_baseline(teacher_copy, tiny_data):
    from sacrebleu.metrics import BLEU, CHRF

    test = pq.read_table(tiny_data / "test.parquet")
    sources, refs = test["source"].to_pylist(), test["target"].to_pylist()
    copy_bleu, copy_chrf = BLEU().corpus_score(sources, [refs]).score, CHRF().corpus_score(sources, [refs]).score
    before = model_hash(teacher_copy)
    code, output = invoke("eval", "--model", str(teacher_copy), "--test", str(tiny_data / "test.parquet"),
                          "--beam-size", "1")
    assert code == 0, output
    assert f"(copy the source: {copy_bleu:.2f})" in output and f"(copy the source: {copy_chrf:.2f})" in output
    record = json.loads((teacher_copy / EVAL_RECORD).read_text())
    assert record["copy_baseline"]["bleu"] == round(copy_bleu, 2) and record["beam_size"] == 1
    assert f"BLEU {record['model']['bleu']:.2f} " in output
    assert re.search(r"speed [\d,.]+ sentences/s, [\d,]+ tokens/s \(int8, beam 1, 2 threads", output), output
    assert model_hash(teacher_copy) == before  # the record does not change the teacher's identity
    below = record["model"]["bleu"] < record["copy_baseline"]["bleu"]
    assert ("warning: teacher" in output) == below


def test_plan_warns_only_for_a_teacher_below_its_copy_baseline(teacher_copy, tiny_data, tmp_path):
    from pipeline.config import load_config
    from pipeline.run import plan_job
    from pipeline.spec import JobSpec

    spec = load_config(write_spec(tmp_path / "s.yaml", tiny_data / "valid.parquet", teacher_copy, tmp_path / "st"),
                       JobSpec)
    assert plan_job(spec).warnings == ()  # never evaluated: nothing to compare
    for bleu, copy, warns in [(0.4, 4.95, True), (6.04, 0.38, False)]:
        (teacher_copy / EVAL_RECORD).write_text(json.dumps({"test": "t.parquet", "model": {"bleu": bleu},
                                                            "copy_baseline": {"bleu": copy}}))
        warnings = plan_job(spec).warnings
        assert bool(warnings) == warns
        assert not warns or f"BLEU {bleu:.2f} on t.parquet, below copying the source (BLEU {copy:.2f})" in warnings[0]
    assert not (tmp_path / "st").exists()  # planning writes nothing
