"""The job spec: the one contract between the people (CLI, REST) and the pipeline. Versioned.

A spec is YAML or JSON::

    version: 1
    corpus: {path: data/train.parquet}            # pipeline.corpus.CorpusSpec
    teacher: {model: work/demo/teacher-ct2}       # tokenizer defaults to the model directory; device: cpu
    decoding: {mode: beam, beam_size: 4, num_hypotheses: 2}
    targets: {top_k: 8}
    output: {store: work/datasets, dataset: bible-beam4}

Unknown fields, non-finite numbers, sizes out of bounds and contradictions (``num_hypotheses > beam_size``,
sampling settings in beam mode, …) fail validation before any work starts, all of them in one error.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config import raise_problems
from pipeline.corpus import CorpusSpec, FilterSpec
from pipeline.ct2 import COMPUTE_TYPES
from pipeline.dataset import NAME_RULE, DatasetName
from pipeline.device import MAX_GPUS_PER_WORKER, Device, check_gpus_per_worker, static_problems
from pipeline.noise import NoiseSpec

SPEC_VERSION = 1


class DecodeMode(StrEnum):
    TEACHER_FORCING = "teacher_forcing"  # distributions along the reference; one row per example
    GREEDY = "greedy"  # 1-best, distributions from the same pass
    BEAM = "beam"  # n-best from beam search, distributions from a second teacher-forced pass
    SAMPLE = "sample"  # n samples, distributions from a second teacher-forced pass


class _Strict(BaseModel):
    # NaN / ±Infinity pass every bound (NaN compares false) and fail late inside a worker: refuse them here.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Token = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^\S+$")]  # one vocabulary entry


class TeacherSpec(_Strict):
    model: str = Field(description="CTranslate2 model directory")
    tokenizer: str | None = Field(None, description="tokenizer directory; default: the model directory")
    compute_type: str = Field("int8", description=f"one of {', '.join(COMPUTE_TYPES)}; float16, bfloat16, "
                              "int8_float16 and int8_bfloat16 need CUDA, int16 a CPU")
    device: Device = Field("cpu", description="cpu (default), cuda, or auto: cuda when the worker reserves a GPU "
                           "(resources.gpus_per_worker > 0) and CTranslate2 sees one in the driver")
    device_index: int = Field(0, ge=0, le=63, description="CUDA device id within the GPUs an actor sees (Ray "
                              "sets CUDA_VISIBLE_DEVICES to the ones it reserved, so 0 is the usual value)")
    source_prefix: list[Token] = Field([], max_length=8, description="tokens put before every source sentence, "
                                       "e.g. [__en__] for M2M100 or [eng_Latn] for NLLB; never stored in source_ids")
    target_prefix: list[Token] = Field([], max_length=8, description="tokens forced at the start of every target, "
                                       "e.g. [__de__]; not stored: hyp_ids and top-k describe the tokens after them")

    @field_validator("compute_type")
    @classmethod
    def _known_compute_type(cls, value: str) -> str:
        if value not in COMPUTE_TYPES:
            raise ValueError(f"unknown compute type {value!r}; choose one of {', '.join(COMPUTE_TYPES)}")
        return value


class DecodingSpec(_Strict):
    mode: DecodeMode = DecodeMode.TEACHER_FORCING
    beam_size: int = Field(4, ge=1, le=64, description="beam mode only")
    num_hypotheses: int = Field(1, ge=1, le=64, description="rows per example (beam: n-best, sample: n)")
    length_penalty: float = Field(1.0, ge=-10, le=10, description="beam mode only: exponent on the length")
    max_length: int = Field(256, ge=1, le=4096, description="max target tokens, </s> included: longer hypotheses "
                            "and (teacher_forcing) references are cut, counted in counts.cut_at_max_length")
    temperature: float = Field(1.0, gt=0, le=100, description="sample mode only")
    top_p: float = Field(1.0, gt=0, le=1, description="sample mode only: nucleus size")
    seed: int = Field(0, ge=0, lt=2**63, description="sample mode only")

    @model_validator(mode="after")
    def _consistent(self) -> DecodingSpec:
        """Every contradiction at once, each under its field."""
        mode = self.mode
        # Compare with the defaults (not model_fields_set) so a dumped spec validates again.
        changed = [n for n, f in type(self).model_fields.items() if getattr(self, n) != f.default]
        problems = []
        if mode in (DecodeMode.TEACHER_FORCING, DecodeMode.GREEDY) and self.num_hypotheses != 1:
            problems.append(("num_hypotheses",
                             f"mode {mode.value} yields one row per example: num_hypotheses must be 1"))
        if mode == DecodeMode.BEAM and self.num_hypotheses > self.beam_size:
            problems.append(("num_hypotheses",
                             f"num_hypotheses ({self.num_hypotheses}) > beam_size ({self.beam_size})"))
        if mode != DecodeMode.BEAM:
            problems += [(n, f"{n} only applies to mode beam, not {mode.value}")
                         for n in changed if n in ("beam_size", "length_penalty")]
        if mode != DecodeMode.SAMPLE:
            problems += [(n, f"{n} only applies to mode sample, not {mode.value}")
                         for n in changed if n in ("temperature", "top_p", "seed")]
        raise_problems(self, problems)
        return self


class TargetsSpec(_Strict):
    top_k: int = Field(8, ge=1, le=1024, description="teacher log-probs kept per target position")


class OutputSpec(_Strict):
    store: str = Field(description="local directory or s3://bucket/prefix holding datasets")
    dataset: DatasetName = Field(description=f"dataset name: {NAME_RULE}")
    shard_size: int = Field(2000, ge=1, le=1_000_000, description="examples per shard")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (default: AWS)")


class ResourcesSpec(_Strict):
    # On CPUs, N single-threaded workers beat one N-threaded worker (README, Benchmarks: 1.39× on 2 cores); the
    # default is that layout for 2 cores, independent of the machine that validates the spec. Each worker holds
    # one copy of the teacher in memory.
    workers: int = Field(2, ge=1, le=1024, description="teacher actors (one CTranslate2 translator each)")
    threads_per_worker: int = Field(1, ge=1, le=256, description="CTranslate2 intra_threads per actor")
    batch_tokens: int = Field(4096, ge=64, le=1 << 20, description="source tokens per CTranslate2 call")
    gpus_per_worker: Annotated[float, AfterValidator(check_gpus_per_worker)] = Field(
        0, ge=0, le=MAX_GPUS_PER_WORKER,
        description="GPUs each CUDA teacher actor reserves: a fraction (0.5: two actors share one GPU) or whole "
                    "GPUs; 0 for a CPU teacher")


class JobSpec(_Strict):
    version: Literal[1] = SPEC_VERSION
    corpus: CorpusSpec
    filters: FilterSpec = FilterSpec()
    teacher: TeacherSpec
    decoding: DecodingSpec = DecodingSpec()
    targets: TargetsSpec = TargetsSpec()
    noise: NoiseSpec = NoiseSpec()
    output: OutputSpec
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="after")
    def _device_consistent(self) -> JobSpec:
        """Device contradictions that hold on any machine; what this machine can run is plan_job's check."""
        t, r = self.teacher, self.resources
        problems = static_problems(t.device, t.compute_type, r.gpus_per_worker)
        raise_problems(self, [(f"{'resources' if f == 'gpus_per_worker' else 'teacher'}.{f}", m)
                              for f, m in problems])
        return self

    @property
    def tokenizer_dir(self) -> str:
        return self.teacher.tokenizer or self.teacher.model
