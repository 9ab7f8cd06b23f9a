"""The one row format every grid result takes: ``results.csv`` rows, the markdown tables and plots read these.

A row is one evaluated model (a student of one grid point and seed, or the grid's teacher) on the grid's test
split: quality (sacrebleu BLEU / chrF, CT2 int8, beam 4) next to size and decoding speed (CT2 int8, same
threads, same sentences), so the size/quality/speed trade-off is visible in every table.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

NoiseKind = Literal["none", "deletion", "substitution", "swap"]
Decoding = Literal["references", "teacher_forcing", "greedy", "beam", "sample"]


class ResultRow(BaseModel):
    """One model's test-split evaluation, with the grid coordinates that produced it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: str = Field(description="the grid's name")
    kind: Literal["student", "teacher"]
    unit: str = Field(description="content key of the evaluated model's unit (sha256 prefix)")
    method: str = Field(description="student loss (nll, token, sentence, hybrid, reverse_kl, …); 'teacher' for it")
    size: str = Field(description="student size: a preset name or 'dD-eE-dD-fF' for an explicit shape")
    parameters: int = Field(ge=0)
    noise_kind: NoiseKind = "none"
    noise_rate: float = Field(0.0, ge=0, lt=1, description="per-word rate of noise_kind on the training sources")
    decoding: Decoding = Field(description="how the teacher produced the training targets ('references' for "
                               "nll, which trains on the references; the teacher's own row says 'beam')")
    seed: int = 0
    steps: int = Field(0, ge=0, description="training steps taken")
    train_minutes: float = Field(0.0, ge=0)
    bleu: float
    chrf: float
    test_sentences: int = Field(gt=0)
    sentences_per_s: float = Field(gt=0, description="CT2 int8 beam-4 translation speed on the test split")
    tokens_per_s: float = Field(gt=0, description="target tokens generated per second, same run")
    threads: int = Field(gt=0, description="CT2 intra_threads of the speed measurement")
    teacher_bleu: float | None = Field(None, description="the grid teacher's BLEU on the same split")

    @property
    def bleu_share(self) -> float | None:
        """BLEU as a fraction of the teacher's (None without a teacher score)."""
        return self.bleu / self.teacher_bleu if self.teacher_bleu else None


CSV_COLUMNS = tuple(ResultRow.model_fields)
