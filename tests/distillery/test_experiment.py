"""``distillery experiment``: grid expansion, content keys, and real runs on a tiny slice (reuse, kill, resume)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distillery.experiment.grid import GridSpec, Inputs, expand

ROOT = Path(__file__).resolve().parents[2]
INPUTS = Inputs(teacher_hash="sha256:t", vocab_hash="sha256:v", train_hash="tr", valid_hash="va", test_hash="te")


def make_grid(**overrides) -> GridSpec:
    base = {"name": "g", "teacher": "teacher", "data": "data", "sizes": ["tiny", "mini"],
            "methods": ["nll", "token", "sentence"],
            "noise": [{"kind": "none"}, {"kind": "deletion", "rate": 0.1}],
            "decoding": ["auto", "greedy"], "seeds": [1, 2, 3]}
    return GridSpec.model_validate(base | overrides)


def test_grid_expands_into_one_unit_per_distinct_piece_of_work():
    units = expand(make_grid(), INPUTS)
    by_kind = {k: [u for u in units if u.kind == k] for k in ("distill", "student", "eval")}
    # Datasets, by hand: nll always trains on the references (teacher forcing); token on teacher forcing (auto)
    # and greedy; sentence on beam (auto) and greedy → {teacher_forcing, greedy, beam} per noise setting.
    decodings = {(u.coords["noise"], u.fields["decoding"]) for u in by_kind["distill"]}
    assert decodings == set(itertools.product(["clean", "deletion-0.1"], ["teacher_forcing", "greedy", "beam"]))
    assert len(by_kind["distill"]) == 6
    # Students per noise: nll 1 dataset, token 2, sentence 2 → 5 (method, dataset) pairs × 2 sizes × 3 seeds.
    assert len(by_kind["student"]) == 2 * 5 * 2 * 3
    assert len(by_kind["eval"]) == len(by_kind["student"]) + 1  # one per student, and the teacher's
    nll = [u for u in by_kind["student"] if u.coords["method"] == "nll"]
    assert {u.coords["decoding"] for u in nll} == {"references"}
    # Dependencies come first, so a runner can start units in list order.
    seen = set()
    for unit in units:
        assert set(unit.needs) <= seen, unit.name
        seen.add(unit.key)


def test_keys_depend_on_content_only():
    units = {u.key: u for u in expand(make_grid(), INPUTS)}
    # The same grid under another name, listed in another order: the same units.
    again = {u.key for u in expand(make_grid(name="other", seeds=[3, 1, 2], sizes=["mini", "tiny"]), INPUTS)}
    assert again == set(units)
    # A longer step budget changes every student (and its eval), not a single dataset.
    longer = expand(make_grid(student={"steps": 5000}), INPUTS)
    assert {u.key for u in longer if u.kind == "distill"} == {k for k, u in units.items() if u.kind == "distill"}
    assert not {u.key for u in longer if u.kind == "student"} & set(units)
    # Another teacher changes everything except nothing: every unit reads it, directly or through its data.
    other_teacher = expand(make_grid(), Inputs(**{**INPUTS.__dict__, "teacher_hash": "sha256:x"}))
    assert not {u.key for u in other_teacher} & set(units)
    # One more seed adds exactly that seed's students and evals.
    extended = {u.key for u in expand(make_grid(seeds=[1, 2, 3, 4]), INPUTS)}
    assert set(units) <= extended and len(extended - set(units)) == 2 * (2 * 5 * 2)


def test_quick_variant_merges_its_overrides():
    grid = make_grid(quick={"train_rows": 50, "sizes": ["tiny"], "student": {"steps": 4}})
    quick = grid.quick_variant()
    assert (quick.name, quick.train_rows, quick.sizes, quick.student.steps) == ("g-quick", 50, ["tiny"], 4)
    assert quick.student.lr == grid.student.lr  # nested settings merge, they are not replaced
    with pytest.raises(ValueError, match="unknown grid field 'size'"):
        make_grid(quick={"size": ["tiny"]}).quick_variant()


@pytest.mark.parametrize("bad, message", [
    ({"sizes": ["huge"]}, "unknown model size 'huge'"),
    ({"methods": ["nope"]}, "unknown loss 'nope'"),
    ({"noise": [{"kind": "deletion", "rate": 0}]}, "rate > 0"),
    ({"decoding": ["nucleus"]}, "decoding"),
])
def test_invalid_grids_are_refused_by_field(bad, message):
    with pytest.raises(ValueError, match=message):
        make_grid(**bad)


# ---- real runs --------------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny_grid(tiny_data, tiny_teacher, tmp_path) -> Path:
    grid = {"name": "tiny", "teacher": str(tiny_teacher["ct2_int8"]), "data": str(tiny_data),
            "train_rows": 120, "valid_rows": 20, "test_rows": 20, "sizes": ["tiny"], "methods": ["nll", "token"],
            "seeds": [1, 2], "student": {"steps": 4, "eval_every": 2, "bleu_sentences": 5, "max_tokens": 600},
            "distill": {"workers": 1, "max_length": 40, "shard_size": 60}, "eval": {"threads": 1}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _markers(cache: Path) -> dict[str, float]:
    return {p.stem: p.stat().st_mtime for p in (cache / "units").glob("*.json")}


@pytest.mark.slow
def test_killed_grid_resumes_and_a_finished_grid_runs_nothing(tiny_grid, ray_local, tmp_path, monkeypatch):
    import ray

    from distillery.experiment import runner
    from distillery.experiment.runner import import_markers, run_grid, write_outputs

    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "distillery.cli", "experiment", str(tiny_grid), "--cache",
                             str(cache), "--out", str(tmp_path / "out")], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not any(name.startswith("student-") for name in _markers(cache)):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray die with students unfinished
    proc.wait()
    finished = _markers(cache)
    grid = GridSpec.model_validate(yaml.safe_load(tiny_grid.read_text()))

    partial = run_grid(grid, cache=cache, execute=False)  # --collect: the finished evaluations' rows, nothing run
    assert partial.ran == [] and set(partial.reused) == set(finished) and _markers(cache) == finished
    assert len(partial.rows) == sum(name.startswith("eval-") for name in finished)

    seen: list[list[str]] = []
    approved: list[set[str]] = []  # per round: the units the runner's own estimate let backfill
    judged: set[str] = set()
    estimate = runner._fits_wait

    def recording_estimate(*args):
        fits = estimate(*args)
        return lambda unit: fits(unit) and (judged.add(unit.name) or True)

    def on_update(run, running):
        seen.append(list(running))
        approved.append(set(judged))
        judged.clear()

    monkeypatch.setattr(runner, "_fits_wait", recording_estimate)
    resumed = run_grid(grid, cache=cache, on_update=on_update)
    every = {u.name for u in resumed.units}
    # Units start when their inputs are done and their CPUs free: an evaluation runs alone, students one per CPU
    # (each has one worker of one thread here), and students start seed by seed.
    cpus = int(ray.cluster_resources()["CPU"])
    for running in seen:
        assert len(running) == 1 or all(n.startswith("student-") for n in running), running
        assert len(running) <= cpus, running
    seed = {u.name: u.coords.get("seed") for u in resumed.units}
    started = list(dict.fromkeys(n for running in seen for n in running if n.startswith("student-")))
    assert [seed[n] for n in started] == sorted(seed[n] for n in started) and started
    # A finished student's evaluation drains the machine (left for the end, a grid cut off meanwhile loses the
    # student with the session's cache): a student that starts between the end of a student and its evaluation
    # must be a backfill the runner's estimate approved in that very round (which estimates fit: test_scheduling).
    first, last = {}, {}
    for i, running in enumerate(seen):
        for name in running:
            first.setdefault(name, i)
            last[name] = i
    by_key = {u.key: u.name for u in resumed.units}
    checked = 0
    for unit in resumed.units:
        inputs = [by_key[k] for k in unit.needs if by_key[k] in first]
        if unit.kind != "eval" or not inputs or not inputs[0].startswith("student-"):
            continue
        ended, evaluated = last[inputs[0]], first[unit.name]
        for n in [n for n in first if n.startswith("student-") and ended < first[n] < evaluated]:
            assert n in approved[first[n]], (unit.name, n, "started while its evaluation drains the machine")
        checked += 1
    assert checked >= 2
    assert len(every) == 1 + 4 + 5  # one dataset, 2 methods × 2 seeds, an eval of each and of the teacher
    assert set(resumed.reused) == set(finished), "a finished unit must be reused, not redone"
    assert set(resumed.ran) == every - set(finished), "exactly the unfinished units run"
    assert not resumed.failed and not resumed.blocked
    assert all(_markers(cache)[name] == mtime for name, mtime in finished.items())

    rows = resumed.rows
    assert [r.kind for r in rows].count("teacher") == 1 and len(rows) == 5
    students = [r for r in rows if r.kind == "student"]
    assert {(r.method, r.seed, r.decoding) for r in students} == {
        ("nll", 1, "references"), ("nll", 2, "references"), ("token", 1, "teacher_forcing"),
        ("token", 2, "teacher_forcing")}
    for row in students:  # each row is its own student's, read back from that run's files
        run = json.loads((cache / "units" / f"student-{row.unit}.json").read_text())["run"]
        results = json.loads((Path(run) / "results.json").read_text())
        assert (row.parameters, row.steps) == (results["parameters"], results["steps"]) and row.steps == 4
        assert row.test_sentences == 20 and row.sentences_per_s > 0 and row.tokens_per_s > 0
        assert row.teacher_bleu == rows[0].bleu
        marker = json.loads((cache / "units" / f"student-{row.unit}.json").read_text())
        # What the report's trajectory tables read: every validation, once (a resumed student validates again).
        assert [r["step"] for r in marker["trajectory"]] == [2, 4] and marker["coords"]["seed"] == row.seed

    again = run_grid(grid, cache=cache)
    assert again.ran == [] and set(again.reused) == every
    assert again.rows == rows

    # The markers travel with the results directory: a fresh clone's cache imports them, and extending the grid
    # by a seed runs only the new units plus the dataset they need, which went with the old machine's cache.
    stale = tmp_path / "results" / "units" / "student-0123456789abcdef.json"  # a unit the grid no longer has
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"trajectory": [{"step": 2, "gate": 0.5}], "coords": {"seed": 1}}))
    write_outputs(grid, again, tmp_path / "results", cache=cache, command="test")
    assert not stale.exists()  # superseded (e.g. a changed setting): the report must not read it as this grid's
    assert {p.stem for p in (tmp_path / "results" / "units").glob("*.json")} == every
    shutil.rmtree(cache / "datasets")
    fresh = tmp_path / "fresh"
    assert import_markers(tmp_path / "results", fresh) == len(every)
    extended = run_grid(grid.model_copy(update={"seeds": [1, 2, 3]}), cache=fresh)
    new = {u.name for u in extended.units} - every
    dataset = next(name for name in every if name.startswith("distill-"))
    assert len(new) == 4 and set(extended.ran) == new | {dataset}, "two students and their evals, one dataset"
    assert set(extended.reused) == every - {dataset} and not extended.failed
    redistilled = json.loads((fresh / "units" / f"{dataset}.json").read_text())["dataset_hash"]
    assert redistilled == json.loads((cache / "units" / f"{dataset}.json").read_text())["dataset_hash"]
    assert [r for r in extended.rows if r.seed != 3] == rows


@pytest.mark.slow
def test_a_failed_unit_is_reported_with_its_log_and_blocks_only_its_dependants(tiny_grid, ray_local, tmp_path):
    from typer.testing import CliRunner

    from distillery.cli import app

    grid = yaml.safe_load(tiny_grid.read_text())
    # No training row fits 4 positions: the student refuses to train (in its driver, before any worker starts).
    grid |= {"methods": ["nll"], "seeds": [1], "sizes": [{"d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                                                          "heads": 2, "ffn_dim": 64, "max_positions": 4}]}
    tiny_grid.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["experiment", str(tiny_grid), "--cache", str(tmp_path / "c"), "--out", str(out)])
    assert result.exit_code == 1, result.output
    output = "".join(result.output.split())  # rich wraps long lines at its console width: compare without spaces
    assert "error:1unitsfailed(student-" in output and "1blockedbythem" in output
    assert "Traceback" not in output
    log = next((tmp_path / "c" / "logs").glob("student-*.log"))
    assert f"(log:{log})" in output and "max_positions" in log.read_text()
    summary = json.loads((out / "units.json").read_text())
    assert len(summary["ran"]) == 2 and len(summary["blocked"]) == 1  # the dataset and the teacher's eval ran
    assert (out / "results.csv").read_text().count("\n") == 2  # header + the teacher's row


def test_a_slice_spreads_over_its_whole_split(tmp_path):
    """Prepared splits keep the corpus order (the Bible's books): a slice must sample all of it, not its head."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillery.experiment.runner import _slice

    src = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [f"{book}.{verse}" for book in range(1, 11) for verse in range(100)]}), src)
    ids = pq.read_table(_slice(src, 50, tmp_path / "s" / "train.parquet"))["id"].to_pylist()
    assert len(ids) == 50 == len(set(ids))
    assert {i.split(".")[0] for i in ids} == {str(book) for book in range(1, 11)}, "every book is in the slice"
    assert _slice(src, None, tmp_path / "x.parquet") == src
    assert pq.read_table(_slice(src, 5000, tmp_path / "all" / "train.parquet")).num_rows == 1000


def test_method_labels_name_what_differs_from_the_defaults():
    from distillery.experiment.grid import method_label
    from trainers.losses import LossConfig

    assert method_label(LossConfig(name="hybrid")) == "hybrid"  # the scalar gate
    assert method_label(LossConfig(name="hybrid", gate="heldout")) == "hybrid[gate=heldout]"
    assert method_label(LossConfig(name="hybrid", gate="heldout", gate_every=2)) == "hybrid[gate=heldout,gate_every=2]"
    assert method_label(LossConfig(name="hybrid", gate="fixed")) == "hybrid[gate=fixed]"  # g 0.5: still a fixed gate
    assert method_label(LossConfig(name="hybrid", gate="fixed", g=0.25)) == "hybrid[g=0.25,gate=fixed]"
    assert method_label(LossConfig(name="token", temperature=2.0)) == "token[temperature=2.0]"
    assert method_label(LossConfig(name="okd", lora_rank=4)) == "okd[lora_rank=4]"
