"""The job spec: the one contract between the people (CLI, REST) and the pipeline. Versioned.

A spec is YAML or JSON::

    version: 1
    corpus: {path: data/train.parquet}            # pipeline.corpus.CorpusSpec
    teacher: {model: work/demo/teacher-ct2}       # tokenizer defaults to the model directory
    decoding: {mode: beam, beam_size: 4, num_hypotheses: 2}
    targets: {top_k: 8}
    output: {store: work/datasets, dataset: bible-beam4}

Unknown fields and contradictions (``num_hypotheses > beam_size``, sampling settings in beam mode, …)
fail validation before any work starts.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.corpus import CorpusSpec, FilterSpec
from pipeline.ct2 import COMPUTE_TYPES
from pipeline.noise import NoiseSpec

SPEC_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DecodeMode(StrEnum):
    TEACHER_FORCING = "teacher_forcing"  # distributions along the reference; one row per example
    GREEDY = "greedy"  # 1-best, distributions from the same pass
    BEAM = "beam"  # n-best from beam search, distributions from a second teacher-forced pass
    SAMPLE = "sample"  # n samples, distributions from a second teacher-forced pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherSpec(_Strict):
    model: str = Field(description="CTranslate2 model directory")
    tokenizer: str | None = Field(None, description="tokenizer directory; default: the model directory")
    compute_type: str = Field("int8", description=f"one of {', '.join(COMPUTE_TYPES)}")

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
    length_penalty: float = Field(1.0, description="beam mode only")
    max_length: int = Field(256, ge=1, le=4096, description="max target tokens, </s> included: longer hypotheses "
                            "and (teacher_forcing) references are cut, counted in counts.cut_at_max_length")
    temperature: float = Field(1.0, gt=0, description="sample mode only")
    top_p: float = Field(1.0, gt=0, le=1, description="sample mode only: nucleus size")
    seed: int = Field(0, description="sample mode only")

    @model_validator(mode="after")
    def _consistent(self) -> DecodingSpec:
        mode = self.mode
        # Compare with the defaults (not model_fields_set) so a dumped spec validates again.
        changed = {n for n, f in type(self).model_fields.items() if getattr(self, n) != f.default}
        if mode in (DecodeMode.TEACHER_FORCING, DecodeMode.GREEDY) and self.num_hypotheses != 1:
            raise ValueError(f"mode {mode.value} yields one row per example: num_hypotheses must be 1")
        if mode == DecodeMode.BEAM and self.num_hypotheses > self.beam_size:
            raise ValueError(f"num_hypotheses ({self.num_hypotheses}) > beam_size ({self.beam_size})")
        if mode != DecodeMode.BEAM and changed & {"beam_size", "length_penalty"}:
            raise ValueError(f"beam_size/length_penalty only apply to mode beam, not {mode.value}")
        if mode != DecodeMode.SAMPLE and changed & {"temperature", "top_p", "seed"}:
            raise ValueError(f"temperature/top_p/seed only apply to mode sample, not {mode.value}")
        return self


class TargetsSpec(_Strict):
    top_k: int = Field(8, ge=1, le=1024, description="teacher log-probs kept per target position")


class OutputSpec(_Strict):
    store: str = Field(description="local directory or s3://bucket/prefix holding datasets")
    dataset: str = Field(description="dataset name: letters, digits, '.', '_', '-'")
    shard_size: int = Field(2000, ge=1, description="examples per shard")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (default: AWS)")

    @field_validator("dataset")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value) or value in (".", ".."):
            raise ValueError(f"invalid dataset name {value!r}: use letters, digits, '.', '_', '-' (≤128)")
        return value


class ResourcesSpec(_Strict):
    workers: int = Field(1, ge=1, description="teacher actors (one CTranslate2 translator each)")
    threads_per_worker: int = Field(2, ge=1, description="CTranslate2 intra_threads per actor")
    batch_tokens: int = Field(4096, ge=64, description="source tokens per CTranslate2 call")


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

    @property
    def tokenizer_dir(self) -> str:
        return self.teacher.tokenizer or self.teacher.model
