"""Markdown tables over aggregated results: the teacher, the main table of a grid and its decoding table."""

from __future__ import annotations

from collections.abc import Sequence

from .stats import Aggregate, Stat

# Column order of the decoding table, and the order rows sort in.
DECODINGS = ("references", "teacher_forcing", "greedy", "beam", "sample")
NOT_AVAILABLE = "n/a"  # a CI with one seed: undefined, not 0


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def fmt_ci(stat: Stat | None, digits: int = 2, *, with_n: bool = True) -> str:
    """``12.34 ± 0.56 (3)``: mean ± 95 % CI half-width (seeds); ``± n/a`` for one seed."""
    if stat is None:
        return "–"
    half = NOT_AVAILABLE if stat.half is None else f"{stat.half:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {half}" + (f" ({stat.n})" if with_n else "")


def fmt_mean(stat: Stat | None, digits: int = 1) -> str:
    return "–" if stat is None else f"{stat.mean:.{digits}f}"


def teacher_of(aggs: Sequence[Aggregate], grid: str) -> Aggregate | None:
    """The grid's teacher group (``None`` without one, or when several teachers make it ambiguous)."""
    teachers = [a for a in aggs if a.grid == grid and a.kind == "teacher"]
    return teachers[0] if len(teachers) == 1 else None


def sort_key(agg: Aggregate) -> tuple:
    decoding = DECODINGS.index(agg.decoding) if agg.decoding in DECODINGS else len(DECODINGS)
    return agg.method, agg.parameters, agg.size, agg.noise_kind != "none", agg.noise_kind, agg.noise_rate, decoding


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def teacher_table(aggs: Sequence[Aggregate]) -> str:
    """One row per teacher group: its size, BLEU/chrF ± CI and decoding speed."""
    rows = [[a.grid, a.size, fmt_params(a.parameters), fmt_ci(a.stat("bleu")), fmt_ci(a.stat("chrf"), with_n=False),
             fmt_mean(a.stat("sentences_per_s")), fmt_mean(a.stat("tokens_per_s"))]
            for a in aggs if a.kind == "teacher"]
    return markdown_table(["grid", "size", "params", "BLEU ± 95 % CI (seeds)", "chrF ± 95 % CI", "sentences/s",
                           "tokens/s"], rows)


def main_table(aggs: Sequence[Aggregate], teacher: Aggregate | None) -> str:
    """Every student group of a grid: size, quality ± CI, share of the teacher's BLEU and speed-up over it."""
    teacher_speed = teacher.stat("sentences_per_s").mean if teacher else None
    rows = []
    for a in sorted((a for a in aggs if a.kind == "student"), key=sort_key):
        # The rows' own teacher BLEU; failing that, the grid's teacher row.
        share = a.stat("bleu_share")
        share = share.mean if share else a.stat("bleu").mean / teacher.stat("bleu").mean if teacher else None
        speed = a.stat("sentences_per_s")
        rows.append([a.method, a.size, fmt_params(a.parameters), a.noise_label, a.decoding, fmt_ci(a.stat("bleu")),
                     fmt_ci(a.stat("chrf"), with_n=False), "–" if share is None else f"{100 * share:.1f} %",
                     fmt_mean(speed), f"{speed.mean / teacher_speed:.2f}×" if teacher_speed else "–",
                     fmt_ci(a.stat("train_minutes"), 1, with_n=False)])
    # Training minutes: wall clock of one student's run (what the online losses trade against quality); machines
    # and loads differ between grids, so compare them within a grid.
    return markdown_table(["method", "size", "params", "noise", "decoding", "BLEU ± 95 % CI (seeds)",
                           "chrF ± 95 % CI", "% of teacher BLEU", "sentences/s", "speed-up vs teacher",
                           "train min ± 95 % CI"], rows)


def decoding_table(aggs: Sequence[Aggregate]) -> str | None:
    """Methods × the teacher's decodings of their data, BLEU ± CI (seeds); ``None`` when no method of the grid
    was trained on data of several decodings.

    One row per method and (size, noise) cell in which some method has several decodings, clean cells first.
    """
    cells: dict[tuple, list[Aggregate]] = {}
    for a in aggs:
        if a.kind == "student":
            cells.setdefault((a.noise_kind != "none", a.noise_kind, a.noise_rate, a.parameters, a.size), []).append(a)
    cells = {k: g for k, g in cells.items()
             if any(len({a.decoding for a in g if a.method == m}) > 1 for m in {a.method for a in g})}
    if not cells:
        return None
    decodings = sorted({a.decoding for g in cells.values() for a in g},
                       key=lambda d: DECODINGS.index(d) if d in DECODINGS else len(DECODINGS))
    rows = []
    for _, group in sorted(cells.items()):
        by = {(a.method, a.decoding): a for a in group}
        for method in sorted({a.method for a in group}):
            rows.append([method, group[0].size, group[0].noise_label]
                        + [fmt_ci(by[method, d].stat("bleu")) if (method, d) in by else "–" for d in decodings])
    return markdown_table(["method", "size", "noise", *decodings], rows)
