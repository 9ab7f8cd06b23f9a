"""The training-side commands through the real CLI (typer's runner, in process): budgets and model checks."""

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
