"""The training-side commands through the real CLI (typer's runner, in process): budgets and model checks."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from distillery.cli import app


def run(*args):
    """Runs the CLI; ``output`` has rich's line wrapping undone."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    result.text = " ".join(result.output.split())
    return result


@pytest.mark.parametrize("case", ["checkpoint", "checkpoint_with_stray_model_bin", "empty"])
def test_eval_on_a_directory_that_is_not_a_ct2_model_is_a_clear_error(case, tiny_data, tiny_teacher, tmp_path):
    model = tmp_path / "model"
    if case == "empty":
        model.mkdir()
        expected = "not a CTranslate2 model"
    else:
        shutil.copytree(tiny_teacher["hf"], model)
        expected = "is a Hugging Face checkpoint, not a CTranslate2 model"
        if case == "checkpoint_with_stray_model_bin":  # what best/ held when its tokenizer came from a CT2 dir
            for name in ("model.bin", "shared_vocabulary.json"):
                shutil.copy2(tiny_teacher["ct2_int8"] / name, model / name)
    result = run("eval", "--model", model, "--test", tiny_data / "test.parquet")
    assert result.exit_code == 2, result.output
    assert "error:" in result.text and expected in result.text
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert not list(model.glob("hyps.*"))


def test_teacher_train_takes_a_step_budget(tiny_data, tiny_tokenizer, tmp_path):
    result = run("teacher", "train", "--data", tiny_data, "--tokenizer", tiny_tokenizer.path, "--out", tmp_path / "t",
                 "--size", "tiny", "--max-steps", 3)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    finished = [e for e in events if e["event"] == "finished"][-1]
    assert finished["reason"] == "max_steps" and finished["step"] == 3
    assert "max_steps after 3 steps" in result.text


def test_demo_teacher_has_a_step_budget_and_an_optional_minutes_cap(tmp_path):
    from distillery.demo import demo_teacher_config
    from pipeline.prepare import Prepared

    prepared = Prepared(out=tmp_path, counts={}, total=0, rejected={})
    cfg = demo_teacher_config(tmp_path, prepared, size="mini", steps=1000)
    assert cfg.optim.max_steps == 1000 and cfg.optim.max_minutes is None
    assert demo_teacher_config(tmp_path, prepared, size="mini", steps=1000, minutes=5).optim.max_minutes == 5
