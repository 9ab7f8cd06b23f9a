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


# -- GPU teachers: the spec validates anywhere; what this machine can run is plan_job's check (test_device.py)
def gpu_spec(**teacher_and_resources) -> dict:
    teacher = {"model": "m", "device": "cuda", "compute_type": "int8_float16"}
    resources = {"gpus_per_worker": 0.5}
    for key, value in teacher_and_resources.items():
        (resources if key == "gpus_per_worker" else teacher)[key] = value
    return {**BASE, "teacher": teacher, "resources": resources}


@pytest.mark.parametrize("compute_type", ["float16", "bfloat16", "int8_float16", "int8_bfloat16", "int8", "float32"])
def test_a_cuda_spec_validates_on_a_machine_without_a_gpu(compute_type):
    spec = JobSpec.model_validate(gpu_spec(compute_type=compute_type, device_index=1))
    assert (spec.teacher.device, spec.teacher.device_index, spec.teacher.compute_type) == ("cuda", 1, compute_type)
    assert spec.resources.gpus_per_worker == 0.5


def test_cpu_stays_the_default():
    spec = JobSpec.model_validate(BASE)
    assert (spec.teacher.device, spec.teacher.device_index, spec.resources.gpus_per_worker) == ("cpu", 0, 0)


@pytest.mark.parametrize("gpus", [0.1, 0.25, 1 / 3, 1, 2, 8])
def test_gpus_per_worker_takes_fractions_or_whole_gpus(gpus):
    assert JobSpec.model_validate(gpu_spec(gpus_per_worker=gpus)).resources.gpus_per_worker == gpus


@pytest.mark.parametrize("gpus, message", [
    (1.5, "a worker takes a fraction of one GPU (0 < g ≤ 1) or whole GPUs"),
    (-0.5, "greater than or equal to 0"), (9, "less than or equal to 8"),
])
def test_gpus_per_worker_out_of_bounds_is_refused(gpus, message):
    with pytest.raises(ValueError, match="resources.gpus_per_worker") as info:
        JobSpec.model_validate(gpu_spec(gpus_per_worker=gpus))
    assert message in str(info.value)


@pytest.mark.parametrize("field, value", [("device", "tpu"), ("device", "gpu"), ("device_index", -1),
                                          ("device_index", 64), ("compute_type", "fp16")])
def test_unknown_devices_and_compute_types_are_refused(field, value):
    with pytest.raises(ValueError, match=f"teacher.{field}"):
        JobSpec.model_validate(gpu_spec(**{field: value}))


def test_every_device_contradiction_is_reported_at_once(tmp_path):
    cpu_gpu_types = problems(tmp_path, "teacher: {model: m, device: cpu, compute_type: float16}\n"
                                       "resources: {gpus_per_worker: 0.5}\n")
    lines = sorted(line.strip() for line in cpu_gpu_types.splitlines()[1:])
    assert lines == [
        "resources.gpus_per_worker: teacher.device is cpu: resources.gpus_per_worker must be 0",
        "teacher.compute_type: compute type 'float16' runs only on CUDA; use teacher.device cuda (or auto) or a CPU "
        "type (int8, int8_float32, float32, int16)",
    ]
    cuda = problems(tmp_path, "teacher: {model: m, device: cuda, compute_type: int16}\n")
    assert "teacher.compute_type: compute type 'int16' runs only on CPUs" in cuda
    assert "resources.gpus_per_worker: teacher.device is cuda: set resources.gpus_per_worker > 0" in cuda


def test_auto_defers_the_compute_type_to_the_machine():
    """auto may end up on either device, so only plan_job (which resolves it) can check the compute type."""
    assert JobSpec.model_validate(gpu_spec(device="auto", compute_type="int16", gpus_per_worker=0))
    assert JobSpec.model_validate(gpu_spec(device="auto", compute_type="float16"))


def test_language_prefixes_are_lists_of_single_tokens(tmp_path):
    spec = JobSpec.model_validate({**BASE, "teacher": {"model": "m", "source_prefix": ["__en__"],
                                                       "target_prefix": ["__de__"]}})
    assert (spec.teacher.source_prefix, spec.teacher.target_prefix) == (["__en__"], ["__de__"])
    assert JobSpec.model_validate(BASE).teacher.target_prefix == []
    message = problems(tmp_path, "teacher: {model: m, source_prefix: ['two words'], target_prefix: ['']}\n")
    assert "teacher.source_prefix.0: String should match pattern" in message
    assert "teacher.target_prefix.0: String should have at least 1 character" in message
