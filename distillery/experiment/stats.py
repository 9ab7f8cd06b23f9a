"""Aggregation of result rows over seeds: means with 95 % Student-t confidence intervals, and contrasts.

A group is every row that shares all grid coordinates but ``seed`` (and ``unit``, which differs per seed). Its
CI half-width is ``t.ppf(0.975, n - 1) * s / sqrt(n)`` with ``s`` the sample standard deviation; with one seed
it is undefined (``None``), never 0. A *contrast* (a difference such as token − sentence, or a difference of
differences) pairs the seeds when every group it combines has the same seeds (the CI of the per-seed contrasts)
and otherwise treats the groups as independent (Welch–Satterthwaite degrees of freedom).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

from .records import ResultRow

LEVEL = 0.95
# Averaged per group; bleu_share is ResultRow.bleu_share (BLEU / the teacher's BLEU).
METRICS = ("bleu", "chrf", "sentences_per_s", "tokens_per_s", "train_minutes", "bleu_share")
# ``size`` names the shape; ``parameters`` is not a coordinate: a student with a learned FFN width (ffn_gates) keeps
# another number of parameters per seed. A group's ``parameters`` is the mean over its seeds (rounded).
GROUP_FIELDS = ("grid", "kind", "method", "size", "noise_kind", "noise_rate", "decoding")


@dataclass(frozen=True)
class Stat:
    """A mean with its 95 % CI half-width (``None`` where undefined: fewer than two values)."""

    mean: float
    half: float | None
    n: int
    paired: bool = False  # a contrast computed over per-seed differences

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half

    def sign(self) -> int:
        """+1 / -1 when the CI lies wholly above / below 0, else 0 (includes 0, or no CI)."""
        if self.half is None:
            return 0
        if self.mean - self.half > 0:
            return 1
        if self.mean + self.half < 0:
            return -1
        return 0


def t_quantile(df: float) -> float:
    """The two-sided 95 % Student-t quantile for ``df`` degrees of freedom."""
    return float(student_t.ppf(0.5 + LEVEL / 2, df))


def mean_ci(values: Sequence[float]) -> Stat:
    """Mean and 95 % CI half-width of a sample (half-width ``None`` for a single value).

    Raises:
        ValueError: for an empty sample.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Stat(mean, None, 1)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Stat(mean, t_quantile(n - 1) * s / math.sqrt(n), n)


@dataclass(frozen=True)
class Aggregate:
    """One group of rows (one grid point over its seeds): its coordinates and per-seed values of each metric."""

    grid: str
    kind: str
    method: str
    size: str
    noise_kind: str
    noise_rate: float
    decoding: str
    values: dict[str, dict[int, float]]  # metric -> seed -> value (a metric without a value is absent)
    parameters: int = 0  # mean over the seeds (they differ only for a learned FFN width)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(sorted(self.values["bleu"]))

    @property
    def n(self) -> int:
        return len(self.values["bleu"])

    def stat(self, metric: str) -> Stat | None:
        """Mean ± CI of a metric over the seeds (``None`` when no row has it, e.g. no teacher BLEU)."""
        per_seed = self.values.get(metric)
        return mean_ci([per_seed[s] for s in sorted(per_seed)]) if per_seed else None

    @property
    def clean(self) -> bool:
        return self.noise_rate == 0

    @property
    def noise_label(self) -> str:
        return "clean" if self.clean else f"{self.noise_kind} {self.noise_rate:g}"


def aggregate(rows: Iterable[ResultRow]) -> list[Aggregate]:
    """Group rows by every coordinate but seed and unit (and parameters, averaged); groups come out in first-seen
    order.

    Raises:
        ValueError: two different units for the same seed of one group (the grid varies something the row does
            not record, and averaging them would mix grid points). The same unit twice is counted once.
    """
    groups: dict[tuple, dict[int, ResultRow]] = {}
    for row in rows:
        key = tuple(getattr(row, f) for f in GROUP_FIELDS)
        seen = groups.setdefault(key, {})
        if row.seed in seen and seen[row.seed].unit != row.unit:
            coords = ", ".join(f"{f}={v}" for f, v in zip(GROUP_FIELDS, key, strict=True))
            raise ValueError(f"two results (units {seen[row.seed].unit} and {row.unit}) for seed {row.seed} "
                             f"of one grid point ({coords})")
        seen[row.seed] = row
    out = []
    for key, by_seed in groups.items():
        values: dict[str, dict[int, float]] = {}
        for metric in METRICS:
            per_seed = {s: getattr(r, metric) for s, r in by_seed.items() if getattr(r, metric) is not None}
            if per_seed:
                values[metric] = per_seed
        parameters = round(math.fsum(r.parameters for r in by_seed.values()) / len(by_seed))
        out.append(Aggregate(**dict(zip(GROUP_FIELDS, key, strict=True)), values=values, parameters=parameters))
    return out


def contrast(terms: Sequence[tuple[float, Aggregate]], metric: str = "bleu") -> Stat:
    """The mean and 95 % CI of ``sum(c * group mean)``, e.g. ``[(1, token), (-1, sentence)]``.

    Paired (the CI of the per-seed contrasts) when every group has the same two or more seeds; otherwise the
    groups are independent: variance ``sum(c² s² / n)`` with Welch–Satterthwaite degrees of freedom, and no CI
    when a group has a single seed.
    """
    samples = [(c, agg.values[metric]) for c, agg in terms]
    seeds = {frozenset(v) for _, v in samples}
    if len(seeds) == 1 and len(next(iter(seeds))) >= 2:
        per_seed = [math.fsum(c * v[s] for c, v in samples) for s in sorted(next(iter(seeds)))]
        stat = mean_ci(per_seed)
        return Stat(stat.mean, stat.half, stat.n, paired=True)
    stats = [(c, mean_ci(list(v.values()))) for c, v in samples]
    mean = math.fsum(c * s.mean for c, s in stats)
    n = min(s.n for _, s in stats)
    if n < 2:
        return Stat(mean, None, n)
    variances = [(c * c * _variance(list(v.values())) / len(v), len(v)) for c, v in samples]
    total = math.fsum(var for var, _ in variances)
    if total == 0:
        return Stat(mean, 0.0, n)
    df = total**2 / math.fsum(var**2 / (k - 1) for var, k in variances)
    return Stat(mean, t_quantile(df) * math.sqrt(total), n)


def _variance(values: Sequence[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
