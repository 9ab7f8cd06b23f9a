"""PNG plots of a grid's aggregated results (matplotlib, Agg backend: no display needed).

A plot whose x axis would hold a single value is not drawn; the caller gets the reason to print instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from .stats import Aggregate  # noqa: E402
from .tables import fmt_params, sort_key  # noqa: E402


@dataclass(frozen=True)
class Plot:
    """A drawn plot (``path``) or the note saying why it was skipped (``note``)."""

    title: str
    path: Path | None = None
    note: str | None = None


def _yerr(aggs: Sequence[Aggregate]) -> list[float]:
    # One seed: no CI, so no bar (NaN draws nothing) rather than a misleading zero-width one.
    return [math.nan if a.stat("bleu").half is None else a.stat("bleu").half for a in aggs]


def _series(aggs: Sequence[Aggregate], fields: Sequence[str]) -> dict[str, list[Aggregate]]:
    """Students split into lines by method and ``fields``; a label names the method and those of ``fields`` that
    vary within a method (token on teacher forcing next to sentence on beam needs no decoding in the label)."""
    students = sorted((a for a in aggs if a.kind == "student"), key=sort_key)
    methods = {a.method for a in students}
    varying = [f for f in fields if any(len({getattr(a, f) for a in students if a.method == m}) > 1 for m in methods)]
    lines: dict[str, list[Aggregate]] = {}
    for a in students:
        gated = ["learned FFN width"] if a.size.endswith("-gates") or "-gates[" in a.size else []  # trainers/glu.py
        label = " · ".join([a.method, *(str(getattr(a, f)) for f in varying), *gated])
        lines.setdefault(label, []).append(a)
    return lines


def _teacher_lines(ax, teacher: Aggregate | None) -> None:
    if teacher is None:
        return
    bleu = teacher.stat("bleu").mean
    ax.axhline(bleu, color="black", linewidth=1.2, label=f"teacher ({bleu:.2f})")
    ax.axhline(0.95 * bleu, color="black", linestyle="--", linewidth=1, label="95 % of teacher")


def _draw_series(ax, series: dict, x: str) -> None:
    """One line per series: mean BLEU against the aggregate attribute ``x``, CI error bars."""
    for i, (label, line) in enumerate(series.items()):
        line = sorted(line, key=lambda a: getattr(a, x))
        ax.errorbar([getattr(a, x) for a in line], [a.stat("bleu").mean for a in line], yerr=_yerr(line),
                    marker="o", capsize=3, label=label, color=_color(i, len(series)))


def bleu_vs_parameters(aggs: Sequence[Aggregate], teacher: Aggregate | None, path: Path) -> Plot:
    """BLEU against student parameters (log x), one line per method (and decoding/noise where those vary); only
    the clean-data students where the grid has any (the noise plot shows the rest)."""
    title = "BLEU vs student parameters"
    students = [a for a in aggs if a.kind == "student"]
    students = [a for a in students if a.clean] or students
    if len({a.parameters for a in students}) < 2:
        return Plot(title, note=f"{title}: not drawn, every student of this grid has the same size.")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = _series(students, ("decoding", "noise_label"))
    _draw_series(ax, series, "parameters")
    _teacher_lines(ax, teacher)
    ax.set_xscale("log")
    sizes = []
    for p in sorted({a.parameters for a in students}):
        if not sizes or p > 1.05 * sizes[-1]:  # sizes within 5 % (a pruned student beside a fixed one) share a tick
            sizes.append(p)
    ax.set_xticks(sizes, [fmt_params(p) for p in sizes], minor=False)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="student parameters (log scale)", ylabel="test BLEU (mean ± 95 % CI over seeds)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path, title)


def bleu_vs_noise(aggs: Sequence[Aggregate], teacher: Aggregate | None, path: Path) -> Plot:
    """BLEU against the noise rate, one panel per noise kind; clean students (rate 0) start every panel."""
    title = "BLEU vs noise rate"
    students = [a for a in aggs if a.kind == "student"]
    kinds = sorted({a.noise_kind for a in students if not a.clean})
    if len({a.noise_rate for a in students}) < 2 or not kinds:
        return Plot(title, note=f"{title}: not drawn, every student of this grid has the same noise rate.")
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.5), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds, strict=True):
        panel = [a for a in students if a.clean or a.noise_kind == kind]
        series = _series(panel, ("size", "decoding"))
        _draw_series(ax, series, "noise_rate")
        _teacher_lines(ax, teacher)
        ax.set(xlabel=f"{kind} rate per word", title=f"noise: {kind}")
        ax.grid(True, alpha=0.3)
    # The panels share their lines (clean students start each): one legend, beside the last panel.
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[0][0].set_ylabel("test BLEU (mean ± 95 % CI over seeds)")
    fig.suptitle(title)
    return _save(fig, path, title)


def _color(i: int, n: int):
    # tab10's strong colours while they suffice, then tab20's 20 (a grid's lines rarely exceed them).
    return plt.get_cmap("tab10" if n <= 10 else "tab20")(i % 20)


def _save(fig, path: Path, title: str) -> Plot:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")  # tight: keeps the legend beside the axes in the image
    plt.close(fig)
    tmp.replace(path)  # never a half-written PNG under the final name
    return Plot(title, path=path)
