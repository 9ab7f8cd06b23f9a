"""The exit-status policy in one place: which errors are invalid input (2) and which a failed run (1)."""

import pytest
from pydantic import ValidationError

from pipeline.config import ConfigError
from pipeline.corpus import CorpusError
from pipeline.ct2 import TeacherError
from pipeline.errors import EXIT_FAILED, EXIT_INVALID, RunError, exit_code, message
from pipeline.run import JobError
from pipeline.spec import JobSpec
from pipeline.tokenizer import TokenizerError


def spec_error() -> ValidationError:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"corpus": {"path": "c"}, "teacher": {"model": "m"}})
    return info.value


@pytest.mark.parametrize("exc, code", [
    (ConfigError("x"), EXIT_INVALID), (CorpusError("x"), EXIT_INVALID), (TeacherError("x"), EXIT_INVALID),
    (TokenizerError("x"), EXIT_INVALID), (JobError("x"), EXIT_INVALID), (FileNotFoundError("x"), EXIT_INVALID),
    (PermissionError("x"), EXIT_INVALID), (spec_error(), EXIT_INVALID),
    (RunError("shards [3] did not complete"), EXIT_FAILED), (RuntimeError("x"), EXIT_FAILED),
    (KeyError("x"), EXIT_FAILED),
])
def test_exit_code(exc, code):
    assert exit_code(exc) == code


def test_a_run_error_wrapping_a_value_error_is_a_failed_run_that_names_its_cause():
    try:
        try:
            raise ValueError("Traceback (most recent call last):\n  File x\nValueError: top_k 9 exceeds 8")
        except ValueError as cause:
            raise RunError("ValueError while distilling") from cause
    except RunError as exc:
        assert exit_code(exc) == EXIT_FAILED
        assert message(exc) == "job failed: ValueError while distilling (ValueError: ValueError: top_k 9 exceeds 8)"


def test_validation_errors_list_every_field():
    assert message(spec_error()).splitlines() == ["invalid settings:", "  output: Field required"]
