"""``make demo``: the shipped teacher distils a slice of the bundled corpus, students learn from it, and every model
is scored and timed on the held-out test split.

The demo is a small grid (``experiments/demo.yaml``; ``--full``: ``experiments/demo-full.yaml``) run by the
experiment runner, so it resumes and reuses exactly like any grid: teacher-forced and beam distillations on the
embedded local Ray, an nll baseline and KD students on Ray Train (step budgets: the same table on any machine),
each exported to CTranslate2 int8 and evaluated with beam 4.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {False: ROOT / "experiments" / "demo.yaml", True: ROOT / "experiments" / "demo-full.yaml"}
TRAINED_ON = {"references": "references", "teacher_forcing": "teacher top-k on refs", "beam": "teacher beam output",
              "greedy": "teacher greedy output", "sample": "teacher samples"}


def run_demo(workdir: Path, *, full: bool, console: Console, quick: bool = False) -> list:
    """Runs (or resumes) the demo grid with its cache and results under ``workdir``; prints and returns its rows."""
    from pipeline.config import load_config

    from .experiment.grid import GridSpec
    from .experiment.progress import GridProgress
    from .experiment.runner import run_grid, write_outputs

    grid = load_config(GRIDS[full], GridSpec)
    grid = grid.quick_variant() if quick else grid
    if not grid.teacher.is_absolute():  # the grid names the teacher shipped in this project
        grid = grid.model_copy(update={"teacher": ROOT / grid.teacher})
    console.print(f"[bold]demo[/]: {GRIDS[full].relative_to(ROOT)} — teacher {grid.teacher.relative_to(ROOT)}, "
                  f"students {', '.join(m.name for m in grid.methods)}; results and cache under {workdir}")
    started, progress = time.monotonic(), None

    def on_update(run, running):
        nonlocal progress
        progress = progress or GridProgress(console, len(run.units) - len(run.reused))
        progress(run, running)

    cache = workdir / "cache"
    run = run_grid(grid, cache=cache, on_update=on_update)
    files = write_outputs(grid, run, workdir / grid.name, cache=cache, command="make demo" + ("-full" if full else ""))
    Console().print(results_table(run.rows))
    console.print(f"{len(run.ran)} units run, {len(run.reused)} reused in {(time.monotonic() - started) / 60:.1f} "
                  f"min → {', '.join(str(f) for f in files if f.suffix in ('.md', '.csv'))}")
    if run.failed:
        from .experiment.runner import GridError

        raise GridError("; ".join(f"{k}: {v}" for k, v in run.failed.items()))
    return run.rows


def results_table(rows) -> Table:
    """Teacher and students on one test split: size, quality and CT2 int8 decoding speed side by side."""
    teacher = next((r for r in rows if r.kind == "teacher"), None)
    title = f"de→en Bible test split ({rows[0].test_sentences:,} verses), CT2 int8, beam 4" if rows else "no results"
    table = Table(title=title)
    for col in ("system", "trained on", "params", "BLEU", "chrF", "% of teacher", "sent/s", "speed-up",
                "train time"):
        table.add_column(col, justify="left" if col in ("system", "trained on") else "right")
    for r in rows:
        share = f"{100 * r.bleu_share:.0f} %" if r.bleu_share is not None and r.kind == "student" else "-"
        speedup = f"{r.sentences_per_s / teacher.sentences_per_s:.1f}×" if teacher and r.kind == "student" else "-"
        params = f"{r.parameters / 1e6:.1f}M" if r.parameters else "?"
        name = "teacher" if r.kind == "teacher" else f"student {r.size} {r.method} (seed {r.seed})"
        trained = "references + other editions" if r.kind == "teacher" else TRAINED_ON[r.decoding]
        time_ = f"{r.train_minutes:.1f} min ({r.steps} steps)" if r.kind == "student" else "see teachers/"
        table.add_row(name, trained, params, f"{r.bleu:.2f}", f"{r.chrf:.2f}", share, f"{r.sentences_per_s:.1f}",
                      speedup, time_)
    return table
