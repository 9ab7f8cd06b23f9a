"""Device resolution, the driver's device check and the Ray resources an actor reserves, on this CPU machine.

The CUDA branches of plan_device/as_torch need a GPU: bench/gpu_teacher.py exercises them on one.
"""

import numpy as np
import pytest
import torch

from pipeline.ct2 import TeacherError
from pipeline.device import actor_resources, cuda_device_count, plan_device, resolve_device

no_gpu = pytest.mark.skipif(cuda_device_count() > 0, reason="checks the refusal on a machine without CUDA")


@pytest.mark.parametrize("device, threads, gpus, expected", [
    ("cpu", 1, 0, {"num_cpus": 1}),
    ("cpu", 4, 0, {"num_cpus": 4}),
    ("cuda", 1, 0.5, {"num_cpus": 1, "num_gpus": 0.5}),  # two actors per GPU, one host thread each
    ("cuda", 2, 0.25, {"num_cpus": 2, "num_gpus": 0.25}),
    ("cuda", 8, 2, {"num_cpus": 8, "num_gpus": 2}),
])
def test_actor_resources_follow_the_spec(device, threads, gpus, expected):
    assert actor_resources(device=device, threads_per_worker=threads, gpus_per_worker=gpus) == expected


def test_actor_resources_from_a_shipped_spec_pack_actors_onto_gpus():
    """Ray places an actor where its num_gpus fits: 1 / 0.5 = 2 translators per GPU."""
    from pipeline.spec import JobSpec

    spec = JobSpec.model_validate({"corpus": {"path": "c"}, "output": {"store": "s", "dataset": "d"},
                                   "teacher": {"model": "m", "device": "cuda", "compute_type": "float16"},
                                   "resources": {"workers": 8, "gpus_per_worker": 0.5, "threads_per_worker": 1}})
    need = actor_resources(device=spec.teacher.device, threads_per_worker=spec.resources.threads_per_worker,
                           gpus_per_worker=spec.resources.gpus_per_worker)
    assert spec.resources.workers * need["num_gpus"] == 4  # GPUs the pool holds at once


def test_auto_uses_cuda_only_with_a_reserved_and_visible_gpu():
    gpus_here = cuda_device_count() > 0
    assert resolve_device("auto", 0.5) == ("cuda" if gpus_here else "cpu")
    assert resolve_device("auto", 0) == "cpu"  # no GPU reserved: Ray would not give the actor one
    assert resolve_device("cpu", 0) == "cpu" and resolve_device("cuda", 0.5) == "cuda"


@no_gpu
def test_cuda_is_refused_locally_without_a_gpu(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(TeacherError, match="teacher.device is cuda but CTranslate2 sees no CUDA device"):
        plan_device("cuda", 0, "float16", 0.5)
    assert plan_device("auto", 0, "int8", 0.5) == "cpu"  # auto falls back, and checks int8 on the CPU


@no_gpu
def test_a_job_joining_a_cluster_leaves_the_gpu_to_its_nodes(monkeypatch):
    """A KubeRay driver runs on a head without GPUs; the actors land on GPU nodes."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert plan_device("cuda", 0, "int8_float16", 0.5, address="ray://head:10001") == "cuda"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert plan_device("cuda", 0, "int8_float16", 0.5) == "cuda"


def test_cpu_compute_type_is_still_checked_on_this_machine(monkeypatch):
    import ctranslate2

    unsupported = [c for c in ("int16", "float16") if c not in ctranslate2.get_supported_compute_types("cpu")]
    if not unsupported:
        pytest.skip("this CPU supports every compute type")
    with pytest.raises(TeacherError, match=f"compute type '{unsupported[0]}' is not supported on this cpu"):
        plan_device("cpu", 0, unsupported[0], 0)


def test_as_torch_shares_a_cpu_storage_view_without_copying():
    import ctranslate2

    from pipeline.worker import as_torch

    array = np.linspace(-3, 3, 600, dtype=np.float32)
    view = ctranslate2.StorageView.from_array(array)
    tensor = as_torch(view)
    assert tensor.device.type == "cpu"
    assert tensor.data_ptr() == view.__array_interface__["data"][0] == array.ctypes.data
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_a_cuda_worker_needs_a_cuda_build_of_torch():
    """The top-k runs in torch on the teacher's device: with a CPU build it would fail in every batch."""
    import torch

    from pipeline.spec import JobSpec
    from pipeline.worker import TeacherWorker

    if torch.cuda.is_available():
        pytest.skip("torch has CUDA here")
    spec = JobSpec.model_validate({"corpus": {"path": "c"}, "output": {"store": "s", "dataset": "d"},
                                   "teacher": {"model": "m", "device": "cuda"}, "resources": {"gpus_per_worker": 1}})
    with pytest.raises(TeacherError, match="torch has no CUDA"):
        TeacherWorker(spec)


def test_as_torch_reads_bfloat16_logits_as_float32():
    """The array interfaces have no bfloat16: a bfloat16 teacher's logits are converted, not refused."""
    import ctranslate2

    from pipeline.worker import as_torch

    array = np.linspace(-3, 3, 600, dtype=np.float32)
    view = ctranslate2.StorageView.from_array(array).to(ctranslate2.DataType.bfloat16)
    tensor = as_torch(view)
    assert tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), array, rtol=2**-8)  # bfloat16 keeps 8 significant bits


def test_cpu_jobs_keep_the_fingerprint_they_had_before_devices_and_prefixes():
    """Datasets written before teacher.device / the language prefixes existed must still resume; a CUDA job
    (other rounding) and a prefixed teacher (other distributions) are other inputs."""
    import hashlib
    import json

    import pyarrow as pa

    from pipeline.run import _fingerprint, sha256_bytes
    from pipeline.spec import JobSpec

    spec = JobSpec.model_validate({"corpus": {"path": "c"}, "output": {"store": "s", "dataset": "d"},
                                   "teacher": {"model": "m", "compute_type": "int8"}})
    corpus = pa.table({"id": ["1", "2"], "source": ["a b", "c"], "target": ["x", "y z"]})

    # the formula of the previous release, restated: teacher fields other than model/tokenizer, no device
    payload = spec.model_dump(mode="json", exclude={"resources", "output"})
    payload["output"] = {"shard_size": spec.output.shard_size}
    payload["teacher"] = {"compute_type": "int8"}
    digest = hashlib.sha256()
    for col in ("id", "source", "target"):
        for value in corpus.column(col).to_pylist():
            digest.update(value.encode() + b"\0")
    payload["corpus"] = digest.hexdigest()
    payload |= {"teacher_hash": "sha256:t", "vocab_hash": "sha256:v"}
    before = sha256_bytes(json.dumps(payload, sort_keys=True).encode())

    assert _fingerprint(spec, "sha256:t", "sha256:v", corpus) == before
    assert _fingerprint(spec, "sha256:t", "sha256:v", corpus, "cuda") != before
    prefixed = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"target_prefix": ["__de__"]})})
    assert _fingerprint(prefixed, "sha256:t", "sha256:v", corpus) != before
