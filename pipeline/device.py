"""Where a teacher runs: device names, the compute types each device accepts, and what an actor reserves.

The spec validates anywhere (a cluster spec is written on a laptop), so :func:`static_problems` knows only
the rules that hold on every machine: the GPU compute types need CUDA, ``int16`` exists only on CPUs. What
this machine's CTranslate2 can run is checked in the driver (:func:`resolve_device`,
``pipeline.ct2.check_compute_type``) before anything is written.
"""

from __future__ import annotations

import os
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]
# float16/bfloat16 activations (and the int8 weights that compute in them) exist only in CTranslate2's CUDA
# backend; its CPU backend reports none of them in get_supported_compute_types("cpu").
GPU_COMPUTE_TYPES = ("float16", "bfloat16", "int8_float16", "int8_bfloat16")
CPU_ONLY_COMPUTE_TYPES = ("int16",)  # CTranslate2's CUDA backend has no int16 GEMM
MAX_GPUS_PER_WORKER = 8  # one node's worth


def static_problems(device: str, compute_type: str, gpus_per_worker: float) -> list[tuple[str, str]]:
    """(field, message) for every device contradiction a spec carries, true on any machine."""
    problems = []
    if device == "cpu" and compute_type in GPU_COMPUTE_TYPES:
        problems.append(("compute_type", f"compute type {compute_type!r} runs only on CUDA; "
                         "use teacher.device cuda (or auto) or a CPU type (int8, int8_float32, float32, int16)"))
    if device == "cuda" and compute_type in CPU_ONLY_COMPUTE_TYPES:
        problems.append(("compute_type", f"compute type {compute_type!r} runs only on CPUs; "
                         f"on CUDA use one of {', '.join(GPU_COMPUTE_TYPES)}, int8 or float32"))
    if device == "cpu" and gpus_per_worker > 0:
        problems.append(("gpus_per_worker", "teacher.device is cpu: resources.gpus_per_worker must be 0"))
    if device == "cuda" and gpus_per_worker == 0:
        # Ray shows an actor only the GPUs it reserved (CUDA_VISIBLE_DEVICES): without a reservation a CUDA
        # translator would find no device, or share one with actors Ray does not know about.
        problems.append(("gpus_per_worker", "teacher.device is cuda: set resources.gpus_per_worker > 0 "
                         "(e.g. 0.5 puts two workers on one GPU)"))
    return problems


def check_gpus_per_worker(value: float) -> float:
    """Ray accepts a fraction of one GPU or a whole number of GPUs, nothing in between (e.g. 1.5)."""
    if value > 1 and not float(value).is_integer():
        raise ValueError(f"{value} GPUs: a worker takes a fraction of one GPU (0 < g ≤ 1) or whole GPUs")
    return value


def cuda_device_count() -> int:
    import ctranslate2

    return ctranslate2.get_cuda_device_count()


def resolve_device(device: str, gpus_per_worker: float) -> str:
    """``auto`` → ``cuda`` when the worker reserves a GPU and CTranslate2 sees one here, else ``cpu``."""
    if device != "auto":
        return device
    return "cuda" if gpus_per_worker > 0 and cuda_device_count() > 0 else "cpu"


def plan_device(device: str, device_index: int, compute_type: str, gpus_per_worker: float, *,
                address: str | None = None) -> str:
    """The device the workers will use, checked in the driver before anything is written.

    A local job (embedded Ray) runs its workers on this machine, so ``cuda`` needs a CUDA device here and the
    compute type must run on it. A job that joins a cluster (``address`` / ``RAY_ADDRESS``) usually has its
    GPUs on other nodes than the driver (deploy/k8s: a CPU head): there Ray places the actors on GPU nodes and
    a worker that cannot load the teacher fails its shards with CTranslate2's reason.

    Raises:
        TeacherError: ``cuda`` (or its compute type) cannot run on this machine.
    """
    from pipeline.ct2 import TeacherError, check_compute_type

    resolved = resolve_device(device, gpus_per_worker)
    if resolved == "cuda" and bool(address or os.environ.get("RAY_ADDRESS")):
        return resolved
    if resolved == "cuda":
        count = cuda_device_count()
        if count == 0:
            raise TeacherError("teacher.device is cuda but CTranslate2 sees no CUDA device on this machine "
                               "(no GPU, or no driver for it); use device cpu or auto")
        if device_index >= count:
            raise TeacherError(f"teacher.device_index {device_index} is out of range: "
                               f"this machine has {count} CUDA device(s)")
    check_compute_type(compute_type, resolved)
    return resolved


def actor_resources(*, device: str, threads_per_worker: int, gpus_per_worker: float) -> dict[str, float]:
    """The Ray resources one teacher actor reserves (``map_batches`` / ``ActorPoolStrategy`` kwargs).

    ``num_cpus`` is the translator's ``intra_threads`` on either device (on a GPU they tokenize and write the
    shard); ``num_gpus`` is requested only for a CUDA teacher, so fractions pack several actors on one GPU.
    """
    resources: dict[str, float] = {"num_cpus": threads_per_worker}
    if device == "cuda":
        resources["num_gpus"] = gpus_per_worker
    return resources

