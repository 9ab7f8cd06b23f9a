"""The grid file (``GridSpec``) and its expansion into units keyed by content hashes.

A grid is student size × KD method × noise (kind, rate) × teacher decoding × seed. It expands into three kinds
of unit, each keyed by a hash of everything that determines its output (never by its position in the grid):

- ``distill``: one distilled dataset (teacher, corpus slice, decoding, noise, top-k);
- ``student``: one student trained on a dataset (size, method, seed, optimiser, step budget);
- ``eval``: one model scored and timed on the test split (BLEU / chrF, sentences/s, tokens/s).

Two grid points that need the same dataset share one distill unit (every method of a decoding, every seed), and
two grids that share a unit share its cached output, so an interrupted or extended grid only runs what is missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.dataset import DatasetName
from trainers.losses import LossConfig
from trainers.models import FFNGates, ModelSize, resolve_size
from trainers.online import needs_online_teacher

from .records import NoiseKind

DecodingChoice = Literal["auto", "teacher_forcing", "greedy", "beam", "sample"]
# Losses that learn the teacher's per-token distributions (along the references by default) vs. the ones that
# learn its output sequences (beam by default): research.md, Kim & Rush.
SEQUENCE_LOSSES = frozenset({"sentence", "hybrid"})
REFERENCE_LOSSES = frozenset({"nll"})  # trains on the references: the teacher's decoding does not matter


class NoisePoint(BaseModel):
    """One noise setting of the grid: ``kind`` at ``rate`` per word on the training sources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: NoiseKind = "none"
    rate: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> NoisePoint:
        if (self.kind == "none") != (self.rate == 0):
            raise ValueError("noise kind 'none' goes with rate 0, and any other kind with a rate > 0")
        return self

    @property
    def label(self) -> str:
        return "clean" if self.kind == "none" else f"{self.kind}-{self.rate:g}"


class StudentSettings(BaseModel):
    """How every student of the grid trains: one optimiser and one step budget, so only the axes differ."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2000, gt=0, description="step budget per student")
    lr: float = Field(7e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    max_tokens: int = Field(3000, gt=0, description="padded tokens per batch")
    eval_every: int = Field(200, gt=0, description="validate (greedy valid BLEU, selects best/) every N steps")
    bleu_sentences: int = Field(300, gt=0, description="valid sentences decoded for that BLEU")
    workers: int = Field(1, ge=1, description="Ray Train workers per student")
    threads_per_worker: int = Field(1, ge=1)


class EvalSettings(BaseModel):
    """The test-split evaluation every model gets: CT2 int8, beam search, timed with fixed threads."""

    model_config = ConfigDict(extra="forbid")

    beam_size: int = Field(4, ge=1)
    threads: int = Field(2, ge=1, description="CT2 intra_threads, the same for every model (speed comparisons)")
    exclusive: bool = Field(True, description="time each model with no other unit running (all CPUs reserved)")


class DistillSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(8, ge=1)
    beam_size: int = Field(4, ge=1, description="beam decoding of the data")
    max_length: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0, description="sample decoding of the data")
    workers: int = Field(2, ge=1, description="teacher actors")
    threads_per_worker: int = Field(1, ge=1)
    shard_size: int = Field(2000, ge=1)
    noise_seed: int = 0


class GridSpec(BaseModel):
    """A ``distillery experiment`` grid file. Paths are relative to the directory the command runs in."""

    model_config = ConfigDict(extra="forbid")

    name: DatasetName = Field(description="names the output directory")
    teacher: Path = Field(description="CTranslate2 teacher directory, its tokenizer beside it")
    teacher_hf: Path | None = Field(None, description="the teacher as a Hugging Face checkpoint, for the online "
                                    "losses okd and on_policy (default: converted back from `teacher` into the "
                                    "cache, as `distillery teacher to-hf` does)")
    teacher_parameters: int | None = Field(None, ge=1, description="the teacher's parameter count (default: "
                                           "model_info.json in the teacher directory)")
    data: Path = Field(description="a `data prepare` directory (train/valid/test.parquet), or `bundled`: the "
                       "bundled de→en Bible corpus, prepared into the cache with its chapter split")
    # Slices are spread evenly over their split (runner._slice), never its head.
    train_rows: int | None = Field(None, gt=0, description="distil and train on N training pairs")
    valid_rows: int | None = Field(None, gt=0, description="validate students on N valid pairs")
    test_rows: int | None = Field(None, gt=0, description="evaluate every model on N test pairs")
    sizes: list[str | ModelSize] = Field(min_length=1, description="student presets or explicit shapes")
    methods: list[str | LossConfig] = Field(min_length=1, description="loss names or full loss configs")
    noise: list[NoisePoint] = Field([NoisePoint()], min_length=1)
    decoding: list[DecodingChoice] = Field(["auto"], min_length=1, description="teacher decoding of the data; "
                                           "auto: teacher forcing for token-level losses, beam for sentence/hybrid")
    seeds: list[int] = Field([1, 2, 3], min_length=1)
    student: StudentSettings = StudentSettings()
    distill: DistillSettings = DistillSettings()
    eval: EvalSettings = EvalSettings()
    quick: dict = Field({}, description="overrides applied with --quick (a slice that runs in minutes)")

    @field_validator("sizes")
    @classmethod
    def _known_sizes(cls, sizes: list) -> list:
        for size in sizes:
            resolve_size(size)
        return sizes

    @field_validator("methods")
    @classmethod
    def _losses(cls, methods: list) -> list:
        return [LossConfig(name=m) if isinstance(m, str) else m for m in methods]

    def quick_variant(self) -> GridSpec:
        """The grid with its ``quick`` overrides (nested settings merge) and ``-quick`` appended to its name."""
        data = self.model_dump(mode="json")
        for key, value in self.quick.items():
            if key not in data or key == "quick":
                raise ValueError(f"quick: unknown grid field {key!r}")
            data[key] = data[key] | value if isinstance(value, dict) and isinstance(data[key], dict) else value
        data |= {"name": f"{self.name}-quick", "quick": {}}
        return GridSpec.model_validate(data)


def content_key(kind: str, fields: dict) -> str:
    """A stable key for a unit: sha256 over its kind and fields (sorted JSON), 16 hex digits."""
    payload = json.dumps({"kind": kind, **fields}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def size_label(size: str | ModelSize) -> str:
    """A preset's name, or the shape (a learned FFN width adds ``-gates`` with its non-default settings)."""
    if isinstance(size, str):
        return size
    label = f"d{size.d_model}-e{size.encoder_layers}-d{size.decoder_layers}-f{size.ffn_dim}"
    if size.ffn_gates is None:
        return label
    default = FFNGates().model_dump()
    changed = {k: v for k, v in size.ffn_gates.model_dump().items() if default[k] != v}
    options = ",".join(f"{k}={v:g}" for k, v in sorted(changed.items()))
    return f"{label}-gates[{options}]" if changed else f"{label}-gates"


def method_label(loss: LossConfig) -> str:
    """The loss name, with the options that differ from the defaults (``hybrid[gate=token]``); a hybrid's gate
    options against that gate's defaults (``hybrid[gate=heldout]``, ``hybrid[g=0.25,gate=fixed]``)."""
    default = LossConfig(name=loss.name, gate=loss.gate).training_fields()
    changed = {k: v for k, v in loss.training_fields().items() if default.get(k) != v}
    if loss.name == "hybrid" and loss.gate != "scalar":
        changed["gate"] = loss.gate
    return loss.name + ("[" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + "]" if changed else "")


def resolve_decoding(loss: LossConfig, choice: DecodingChoice) -> str:
    """The decoding a method trains on; nll always trains on the references (the teacher-forcing dataset)."""
    if loss.name in REFERENCE_LOSSES:
        return "teacher_forcing"
    if choice == "auto":
        return "beam" if loss.name in SEQUENCE_LOSSES else "teacher_forcing"
    return choice


@dataclass(frozen=True)
class Unit:
    """One cacheable piece of work. ``needs`` are the keys of the units whose outputs it reads."""

    kind: Literal["distill", "student", "eval"]
    key: str
    fields: dict
    needs: tuple[str, ...] = ()
    coords: dict = field(default_factory=dict)  # grid coordinates, for the result rows (not part of the key)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.key}"


@dataclass(frozen=True)
class Inputs:
    """Content identities of the grid's inputs (computed once, by the runner, from the files)."""

    teacher_hash: str
    vocab_hash: str
    train_hash: str
    valid_hash: str
    test_hash: str
    teacher_hf_hash: str | None = None  # the online teacher's weights (okd / on_policy students only)


def expand(grid: GridSpec, inputs: Inputs) -> list[Unit]:
    """Every unit the grid needs, dependencies before dependants, each once (shared units are merged)."""
    units: dict[str, Unit] = {}

    def add(unit: Unit) -> Unit:
        units.setdefault(unit.key, unit)
        return units[unit.key]

    teacher_eval = add(Unit("eval", content_key("eval", {
        "model": inputs.teacher_hash, "test": inputs.test_hash, "test_rows": grid.test_rows,
        "eval": grid.eval.model_dump(exclude={"exclusive"})}), {"model": "teacher"},
        coords={"kind": "teacher"}))
    for noise in grid.noise:
        for choice in grid.decoding:
            for loss in grid.methods:
                decoding = resolve_decoding(loss, choice)
                d = grid.distill
                distill_fields = {
                    "teacher": inputs.teacher_hash, "vocab": inputs.vocab_hash, "train": inputs.train_hash,
                    "train_rows": grid.train_rows, "decoding": decoding, "top_k": d.top_k,
                    "max_length": d.max_length, "noise": noise.model_dump(), "noise_seed": d.noise_seed,
                    **({"beam_size": d.beam_size} if decoding == "beam" else {}),
                    **({"temperature": d.temperature} if decoding == "sample" else {}),
                }
                dataset = add(Unit("distill", content_key("distill", distill_fields), distill_fields,
                                   coords={"decoding": decoding, "noise": noise.label}))
                for size in grid.sizes:
                    for seed in grid.seeds:
                        s = grid.student
                        student_fields = {
                            "dataset": dataset.key, "size": resolve_size(size).model_dump(),
                            "loss": loss.training_fields(), "seed": seed, "valid": inputs.valid_hash,
                            "valid_rows": grid.valid_rows, "settings": s.model_dump(),
                        }
                        if needs_online_teacher(loss.name):  # the teacher it runs beside it, by content
                            student_fields["teacher_hf"] = inputs.teacher_hf_hash
                        coords = {"kind": "student", "method": method_label(loss), "size": size_label(size),
                                  "noise_kind": noise.kind, "noise_rate": noise.rate, "seed": seed,
                                  "decoding": "references" if loss.name in REFERENCE_LOSSES else decoding}
                        student = add(Unit("student", content_key("student", student_fields), student_fields,
                                           needs=(dataset.key,), coords=coords))
                        add(Unit("eval", content_key("eval", {
                            "model": student.key, "test": inputs.test_hash, "test_rows": grid.test_rows,
                            "eval": grid.eval.model_dump(exclude={"exclusive"})}), {"model": student.key},
                            needs=(student.key,), coords=coords))
    del teacher_eval
    return list(units.values())
