"""The command line refuses bad dataset names with `error:` and exit 2, before anything is written."""

import json

import pytest
from typer.testing import CliRunner

from distillery.cli import app

BAD_NAMES = ["abc\n", "abc\r", "a/b", "..", "", "x" * 129, "аbc"]  # the last with a Cyrillic а


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_distill_refuses_a_bad_dataset_name(tmp_path, name):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"corpus": {"path": str(tmp_path / "c.tsv")}, "teacher": {"model": str(tmp_path)},
                                "output": {"store": str(tmp_path / "store"), "dataset": name}}))
    code, output = run("distill", str(spec))
    assert code == 2 and "error:" in output and "invalid dataset name" in output, output
    assert "Traceback" not in output and not (tmp_path / "store").exists()


def test_train_refuses_a_bad_dataset_name(tmp_path):
    config = tmp_path / "student.json"
    config.write_text(json.dumps({"dataset": {"store": str(tmp_path / "store"), "name": "abc\n"},
                                  "valid": str(tmp_path / "valid.parquet"), "tokenizer": str(tmp_path),
                                  "out": str(tmp_path / "run")}))
    code, output = run("train", str(config))
    assert code == 2 and "dataset.name" in output and "invalid dataset name" in output, output
    assert not (tmp_path / "run").exists()
