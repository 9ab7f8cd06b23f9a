"""The dataset contract (pipeline/dataset.py): names matched whole, versioned files refused clearly, light import."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.dataset import (
    DatasetFileError,
    JobRecord,
    Manifest,
    Progress,
    ProgressState,
    Sidecar,
    shard_file,
    sidecar_file,
    valid_name,
)
from pipeline.spec import JobSpec
from pipeline.storage import Store

ROOT = Path(__file__).resolve().parents[2]

# Each would name a directory other than the one asked for, or one a person cannot tell apart from it.
BAD_NAMES = ["abc\n", "abc\r", "abc\r\n", "a/b", "a\\b", "..", ".", "", " abc", "abc ", "a\tb", "a\x00b",
             "x" * 129, ".hidden", "-dash", "аbc",  # Cyrillic а
             "ａbc",  # fullwidth a
             "abc\u200b",  # zero-width space
             "ǆ", "٣"]  # a Latin ligature, an Arabic-Indic digit
GOOD_NAMES = ["a", "bible-beam4", "ds_1.v2", "A" * 128, "0"]


def spec(dataset: str) -> dict:
    return {"corpus": {"path": "c.tsv"}, "teacher": {"model": "t"}, "output": {"store": "s", "dataset": dataset}}


def test_importing_the_contract_pulls_in_no_torch_ctranslate2_or_ray():
    code = ("import sys, pipeline.dataset; "
            "print(sorted(m for m in ('torch', 'ctranslate2', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_dataset_names_are_refused_by_the_spec(name):
    assert not valid_name(name)
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(spec(name))
    [error] = err.value.errors()
    assert error["loc"] == ("output", "dataset") and "invalid dataset name" in error["msg"]
    assert len(error["msg"]) < 300  # a huge name is not echoed whole


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_dataset_names_are_accepted(name):
    assert valid_name(name) and JobSpec.model_validate(spec(name)).output.dataset == name


def progress_file(**fields) -> str:
    return json.dumps({"progress_version": 1, "state": "running", "shards_total": 3} | fields)


def test_files_of_a_newer_version_are_refused_with_the_version_named():
    for model, field in ((Manifest, "manifest_version"), (Progress, "progress_version"), (JobRecord, "job_version")):
        with pytest.raises(DatasetFileError) as err:
            model.parse(json.dumps({field: 2, "anything": "else"}))
        message = str(err.value)
        assert f"{field} 2" in message and "reads version 1" in message and "anything" not in message


def test_progress_round_trips_and_a_renamed_or_missing_field_is_an_error():
    progress = Progress.parse(progress_file(shards_done=1, eta_s=None))
    assert progress.state is ProgressState.RUNNING and progress.shards_done == 1
    assert Progress.parse(progress.model_dump_json()) == progress
    # Files written before the version field existed have the same fields: read as version 1.
    assert Progress.parse(json.dumps({"state": "succeeded", "shards_total": 1})).shards_total == 1
    with pytest.raises(DatasetFileError, match="shards_finished"):
        Progress.parse(progress_file(shards_finished=1))  # a renamed field is not silently dropped
    with pytest.raises(DatasetFileError, match="state"):
        Progress.parse(json.dumps({"progress_version": 1, "shards_total": 3}))
    with pytest.raises(DatasetFileError, match="state"):
        Progress.parse(progress_file(state="paused"))


def test_files_are_written_and_read_where_the_layout_says(tmp_path):
    store = Store.from_uri(str(tmp_path))
    assert Progress.read(store, "ds") is None and JobRecord.read(store, "ds") is None
    Progress(state="failed", shards_total=2, error="boom").write(store, "ds")
    JobRecord(fingerprint="sha256:f", spec={"version": 1}).write(store, "ds")
    on_disk = json.loads((tmp_path / "ds" / "_progress.json").read_text())
    assert on_disk["state"] == "failed" and on_disk["progress_version"] == 1 and on_disk["error"] == "boom"
    assert json.loads((tmp_path / "ds" / "_job.json").read_text())["fingerprint"] == "sha256:f"
    assert Progress.read(store, "ds").error == "boom"
    (tmp_path / "ds" / "_job.json").write_text('{"job_version": 7}')
    with pytest.raises(DatasetFileError, match=r"_job.json.*job_version 7"):
        JobRecord.read(store, "ds")

    assert (shard_file(3), sidecar_file(3)) == ("part-00003.parquet", "_part-00003.json")
    sidecar = Sidecar(name=shard_file(3), shard=3, first_index=30, last_index=39, examples=10, rows=10,
                      target_tokens=100, bytes=5, sha256="sha256:x", seconds=1.0, pid=1, peak_rss_mb=2.0)
    sidecar.write(store, "ds")
    assert Sidecar.read(store, "ds", 3) == sidecar
    assert "pid" not in sidecar.entry().model_dump()  # the manifest lists the data, not the run
    assert sidecar.node_id is None  # written outside Ray (and sidecars from before node_id read the same)
    sidecar.model_copy(update={"node_id": "a" * 56}).write(store, "ds")
    on_node = Sidecar.read(store, "ds", 3)
    assert on_node.node_id == "a" * 56 and "node_id" not in on_node.entry().model_dump()
    (tmp_path / "ds" / "_part-00003.json").write_text("{half a sidecar")
    assert Sidecar.read(store, "ds", 3) is None  # unreadable: the shard is redone, not trusted
