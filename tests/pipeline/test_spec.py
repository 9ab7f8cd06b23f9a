"""The job spec refuses what a worker could not honour, all problems at once, before any work starts."""

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.spec import JobSpec

BASE = {"corpus": {"path": "c.tsv"}, "teacher": {"model": "m"}, "output": {"store": "s", "dataset": "d"}}


def problems(tmp_path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE) + text)
    with pytest.raises(ConfigError) as info:
        load_config(path, JobSpec)
    return str(info.value)


@pytest.mark.parametrize("section, field, value", [
    ("decoding", "length_penalty", ".nan"), ("decoding", "length_penalty", "-.inf"),
    ("decoding", "temperature", ".inf"), ("filters", "max_length_ratio", ".nan"),
    ("noise", "deletion", ".nan"),
])
def test_non_finite_numbers_are_refused(tmp_path, section, field, value):
    mode = {"length_penalty": "beam", "temperature": "sample"}.get(field)
    extra = f"  mode: {mode}\n" if mode else ""
    message = problems(tmp_path, f"{section}:\n{extra}  {field}: {value}\n")
    assert f"{section}.{field}: Input should be a finite number" in message


def test_non_finite_numbers_are_refused_in_json_too():
    text = ('{"corpus": {"path": "c.tsv"}, "teacher": {"model": "m"}, "output": {"store": "s", "dataset": "d"},'
            ' "decoding": {"mode": "sample", "temperature": NaN}}')
    with pytest.raises(ValueError, match="finite number"):
        JobSpec.model_validate_json(text)


@pytest.mark.parametrize("section, field", [("output", "shard_size"), ("resources", "workers"),
                                            ("resources", "threads_per_worker"), ("resources", "batch_tokens"),
                                            ("filters", "max_words"), ("filters", "max_chars")])
def test_sizes_have_an_upper_bound(tmp_path, section, field):
    message = problems(tmp_path, f"{section}: {{{field}: {10**30}}}\n")
    assert f"{section}.{field}: Input should be less than or equal to" in message


def test_every_cross_field_problem_is_reported_at_once_with_field_errors(tmp_path):
    message = problems(tmp_path, "decoding: {mode: greedy, num_hypotheses: 3, beam_size: 8, top_p: 0.9}\n"
                                 "output: {store: s, dataset: d, shard_size: 0}\n"
                                 "corpus: {path: c.tsv, target_path: c.en, format: tsv}\n")
    lines = sorted(line.strip() for line in message.splitlines()[1:])
    assert lines == sorted([
        "decoding.num_hypotheses: mode greedy yields one row per example: num_hypotheses must be 1",
        "decoding.beam_size: beam_size only applies to mode beam, not greedy",
        "decoding.top_p: top_p only applies to mode sample, not greedy",
        "output.shard_size: Input should be greater than or equal to 1",
        "corpus.target_path: target_path is only for format 'text', not 'tsv'",
    ])


def test_default_resources_are_workers_of_one_thread():
    """The README's advice for CPUs (N workers × 1 thread beats 1 worker × N threads) is the default."""
    resources = JobSpec.model_validate(BASE).resources
    assert (resources.workers, resources.threads_per_worker) == (2, 1)


def test_a_dumped_spec_validates_again():
    spec = JobSpec.model_validate(BASE | {"decoding": {"mode": "beam", "beam_size": 5, "num_hypotheses": 2,
                                                       "length_penalty": 0.6}})
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
