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


def test_the_shipped_teachers_recipe_is_a_valid_config_with_a_step_budget():
    from pathlib import Path

    from pipeline.config import load_config
    from trainers.teacher import TeacherConfig

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "teacher-bible-de-en.yaml"
    cfg = load_config(recipe, TeacherConfig)
    # A step budget, never minutes: the same command gives the same teacher on a busy machine as on an idle one.
    assert cfg.optim.max_steps and cfg.optim.max_minutes is None
    assert cfg.optim.keep_last >= 2  # the final model averages the last validations' snapshots
