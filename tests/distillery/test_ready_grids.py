"""The ready grids in experiments/: they validate, are sized as documented, and their quick variants run for real
against the shipped teacher (one shared cache, so units they share run once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from distillery.cli import app
from distillery.experiment.grid import GridSpec, Inputs, expand
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
GRIDS = sorted((ROOT / "experiments").glob("*.yaml"))
READY = ("capacity", "noise", "decoding")
INPUTS = Inputs(teacher_hash="t", vocab_hash="v", train_hash="tr", valid_hash="va", test_hash="te")


def test_the_ready_grids_exist_and_name_the_shipped_teacher():
    names = {p.stem for p in GRIDS}
    assert set(READY) | {"demo", "demo-full"} <= names
    for path in GRIDS:
        grid = load_config(path, GridSpec)
        assert grid.name == path.stem
        assert (ROOT / grid.teacher / "model.bin").is_file(), f"{path.name}: {grid.teacher} is not shipped"


@pytest.mark.parametrize("name", READY)
def test_ready_grids_have_three_seeds_and_a_smaller_quick_variant(name):
    grid = load_config(ROOT / "experiments" / f"{name}.yaml", GridSpec)
    quick = grid.quick_variant()
    assert len(grid.seeds) >= 3
    full_units, quick_units = expand(grid, INPUTS), expand(quick, INPUTS)
    assert len(quick_units) < len(full_units)
    assert quick.train_rows and quick.train_rows <= 500 and quick.student.steps <= 10
    # The quick variant keeps the axis the grid studies (otherwise it would test nothing of it).
    axis = {"capacity": "methods", "noise": "noise", "decoding": "decoding"}[name]
    assert len(getattr(quick, axis)) >= 2


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("grid-cache")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo", *READY, "okd"])  # okd: the online teacher, converted back into the cache
def test_quick_variant_runs_and_writes_its_results(name, ray_local, shared_cache, tmp_path, monkeypatch):
    from distillery.experiment.report import read_csv

    monkeypatch.chdir(ROOT)  # grid paths are relative to the project root
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["experiment", f"experiments/{name}.yaml", "--quick", "--cache",
                                      str(shared_cache), "--out", str(out)])
    assert result.exit_code == 0, result.output
    grid = load_config(ROOT / "experiments" / f"{name}.yaml", GridSpec).quick_variant()
    rows = read_csv(out / "results.csv")
    students = [r for r in rows if r.kind == "student"]
    n_students = len({(m.name, d) for m in grid.methods for d in grid.decoding} if name == "decoding" else
                     grid.methods) * len(grid.sizes) * len(grid.noise) * len(grid.seeds)
    assert len(students) == n_students and sum(r.kind == "teacher" for r in rows) == 1
    assert all(r.test_sentences == grid.test_rows and r.sentences_per_s > 0 for r in rows)
    markdown = (out / "results.md").read_text()
    assert "distillery experiment" in markdown.splitlines()[0]
    for row in students:
        assert f"{row.bleu:.2f}" in markdown
    if name == "noise":  # two noise rates: the noise plot is drawn
        assert (out / f"{grid.name}-bleu-vs-noise.png").stat().st_size > 10_000
    if name == "okd":  # the students ran beside the teacher the grid converted back, and say how long they took
        assert len(list((shared_cache / "teachers").glob("*-hf/model.safetensors"))) == 1
        assert all(r.train_minutes > 0 for r in students)


@pytest.mark.slow
def test_demo_prints_the_table_of_its_grid(ray_local, shared_cache, tmp_path, monkeypatch):
    """`distillery demo --quick` is the demo grid's quick variant: with the cache the test above filled, every
    unit is reused and the demo prints teacher and students with size, quality and speed."""
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "cache").symlink_to(shared_cache)
    result = CliRunner().invoke(app, ["demo", "--quick", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "0 units run" in result.output
    for method in ("nll", "token", "sentence"):
        assert f"student tiny {method} (seed 1)" in result.output
    assert "speed-up" in result.output and (tmp_path / "demo-quick" / "results.md").is_file()
