"""A grid's report: ``results.csv`` (one ResultRow per evaluated model), ``results.md`` (mean ± 95 % CI over
seeds, the decoding table, the plots, the claims) and ``docs/RESULTS.md`` assembled from several grids.

Pure functions over rows: nothing here runs a model. Every file is written under a temporary name and renamed,
so an interrupted report never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import ValidationError

from pipeline.errors import InputError

from .claims import TITLES, Verdict, evaluate_claims
from .plots import bleu_vs_noise, bleu_vs_parameters
from .records import CSV_COLUMNS, ResultRow
from .stats import Aggregate, aggregate
from .tables import decoding_table, main_table, teacher_of, teacher_table
from .trajectories import read_trajectories, trajectory_tables

RESULTS_CSV = "results.csv"


def write_csv(rows: Iterable[ResultRow], path: Path) -> Path:
    """``CSV_COLUMNS`` then one line per row; floats as Python's shortest exact repr, ``None`` as empty."""
    path = Path(path)
    lines = [[("" if v is None else repr(v) if isinstance(v, float) else v)
              for v in (getattr(r, c) for c in CSV_COLUMNS)] for r in rows]
    with _atomic(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(lines)
    return path


def read_csv(path: Path) -> list[ResultRow]:
    """The rows of a ``results.csv``.

    Raises:
        FileNotFoundError: no such file.
        InputError: other columns than ``CSV_COLUMNS``, or a row that is not a valid ResultRow (all listed).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise InputError(f"{path}: expected the columns {','.join(CSV_COLUMNS)}, found {header}")
        rows, problems = [], []
        for line, values in enumerate(reader, start=2):
            if len(values) != len(CSV_COLUMNS):
                problems.append(f"{path}:{line}: {len(values)} fields, expected {len(CSV_COLUMNS)}")
                continue
            data = {c: (None if v == "" else v) for c, v in zip(CSV_COLUMNS, values, strict=True)}
            try:
                rows.append(ResultRow.model_validate(data))
            except ValidationError as exc:
                errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                problems.append(f"{path}:{line}: {errs}")
    if problems:
        raise InputError("invalid results:\n  " + "\n  ".join(problems))
    return rows


def write_markdown(rows: Sequence[ResultRow], path: Path, *, title: str, command: str,
                   units_dir: Path | None = None) -> Path:
    """``results.md`` of one or more grids, its plots written beside it (``<grid>-bleu-vs-*.png``); with
    ``units_dir`` (the results' unit markers) the trajectory tables of its students' gates and FFN widths.

    Raises:
        InputError: no rows.
    """
    path = Path(path)
    aggs = _aggregate(rows)
    lines = [_regenerate(command), "", f"# {title}", "", _METHOD, "", "## Teacher", "", teacher_table(aggs), ""]
    markers = read_trajectories(units_dir) if units_dir is not None else []
    for grid in _grids(aggs):
        lines += _grid_section([a for a in aggs if a.grid == grid], path.parent, "", claims_detail=True,
                               trajectories=markers)  # one grid's results directory holds one grid's units
    _write_text(path, "\n".join(lines))
    return path


def write_results_doc(grid_dirs: Sequence[Path], out: Path, *, command: str) -> Path:
    """``docs/RESULTS.md`` from several grid directories' ``results.csv``: per grid its tables and plots (drawn
    into ``<out dir>/results/``), then per claim each grid's verdict and a reading for a human to write.
    A reading already written in ``out`` (between its ``reading`` markers) is kept.

    Raises:
        FileNotFoundError: a grid directory without ``results.csv``.
        InputError: an invalid or empty ``results.csv``.
    """
    out = Path(out)
    aggs: list[Aggregate] = []
    trajectories: dict[str, list[dict]] = {}
    for directory in grid_dirs:
        found = _aggregate(read_csv(Path(directory) / RESULTS_CSV))
        if twice := set(_grids(found)) & set(_grids(aggs)):
            raise InputError(f"{directory}: grid {sorted(twice)[0]!r} is also in an earlier directory")
        aggs += found
        for grid in _grids(found):
            trajectories[grid] = read_trajectories(Path(directory) / "units")
    grids = _grids(aggs)
    claims = {g: {c.key: c for c in evaluate_claims([a for a in aggs if a.grid == g])} for g in grids}
    readings = _readings(out)
    lines = [_regenerate(command), "", "# Results", "", _METHOD, "", "## Headline", ""]
    lines += [f"- **{g}** — {c['e'].verdict}: {c['e'].sentence}" for g, c in claims.items()]
    lines += ["", "## Teachers", "", teacher_table(aggs), ""]
    for grid in grids:
        lines += _grid_section([a for a in aggs if a.grid == grid], out.parent / "results", "results/",
                               claims_detail=False, trajectories=trajectories.get(grid, []))
    lines += ["## The research's claims", "", _VERDICTS, ""]
    for key, title in TITLES.items():
        lines += [f"### ({key}) {title}", ""]
        lines += [f"- **{g}** — {c[key].verdict}: {c[key].sentence}" for g, c in claims.items()
                  if c[key].verdict is not Verdict.NOT_MEASURED] or ["- not measured by any of these grids."]
        lines += ["", f"<!-- reading {key}: written by a human, kept when this file is regenerated -->",
                  readings.get(key, _READING_PLACEHOLDER), f"<!-- /reading {key} -->", ""]
    _write_text(out, "\n".join(lines))
    return out


# --- pieces ------------------------------------------------------------------------------------------------

_METHOD = ("Each row is one grid point: the mean over its seeds ± the 95 % confidence half-width "
           "(Student t, n − 1 degrees of freedom; `n/a` with a single seed), the number of seeds in parentheses. "
           "BLEU and chrF by sacrebleu on the test split, CT2 int8, beam 4; sentences/s with the same threads "
           "for every model; speed-up = a student's sentences/s over the teacher's.")
_VERDICTS = ("Verdicts come from the tool (`distillery/experiment/claims.py`): a difference counts when its 95 % CI "
             "excludes 0 (paired over seeds where the groups share them, Welch otherwise).")
_READING_PLACEHOLDER = "**Reading:** … _(placeholder: a human reading of these numbers on this corpus goes here)_"


def _regenerate(command: str) -> str:
    return f"Regenerate this file with `{command}` (written by distillery; edits outside the readings are lost)."


def _aggregate(rows: Sequence[ResultRow]) -> list[Aggregate]:
    if not rows:
        raise InputError("no result rows to report")
    return aggregate(rows)


def _grids(aggs: Sequence[Aggregate]) -> list[str]:
    return list(dict.fromkeys(a.grid for a in aggs))


def _grid_section(aggs: list[Aggregate], plot_dir: Path, link: str, *, claims_detail: bool,
                  trajectories: Sequence[dict] = ()) -> list[str]:
    grid = aggs[0].grid
    teacher = teacher_of(aggs, grid)
    lines = [f"## Grid `{grid}`", "", main_table(aggs, teacher), "", "### Decoding strategies", ""]
    table = decoding_table(aggs)
    if table:
        lines += ["BLEU ± 95 % CI (seeds) by the teacher's decoding of the training data:", "", table, ""]
    else:
        lines += ["Every method of this grid was trained on one decoding of the teacher: no decoding comparison.", ""]
    lines += ["### Plots", ""]
    for draw, name in ((bleu_vs_parameters, "bleu-vs-parameters"), (bleu_vs_noise, "bleu-vs-noise")):
        target = plot_dir / f"{grid}-{name}.png"
        plot = draw(aggs, teacher, target)
        if plot.path is None:
            target.unlink(missing_ok=True)  # a plot of an earlier, larger version of the grid would be stale
        lines += [f"![{plot.title}]({link}{plot.path.name})" if plot.path else f"_{plot.note}_", ""]
    if blocks := trajectory_tables(trajectories):
        lines += ["### Trajectories", "", *(line for block in blocks for line in (block, ""))]
    measured = [c for c in evaluate_claims(aggs) if c.verdict is not Verdict.NOT_MEASURED]
    lines += ["### Claims measured by this grid", ""]
    lines += [f"- ({c.key}) {c.title} — **{c.verdict}**" + (f": {c.sentence}" if claims_detail else "")
              for c in measured] or ["- none"]
    return lines + [""]


def _readings(out: Path) -> dict[str, str]:
    if not out.exists():
        return {}
    found = re.finditer(r"<!-- reading (\w+):[^>]*-->\n(.*?)\n<!-- /reading \1 -->", out.read_text(), re.DOTALL)
    return {m.group(1): m.group(2) for m in found}


class _atomic:
    """``with _atomic(path) as tmp``: write ``tmp``; it becomes ``path`` only if the block succeeds."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
