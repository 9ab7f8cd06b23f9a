"""Runs a grid's units on Ray, each once: a unit whose marker exists in the cache is reused, never re-run.

Cache layout (shared by every grid that names the same cache)::

    data/<key>/{train,valid,test}.parquet   slices of the prepared splits (train_rows, …)
    datasets/d-<key>/                        distilled datasets (pipeline.run)
    students/s-<key>/                        student runs (trainers.student: checkpoint/, best/, ct2/, …)
    units/<kind>-<key>.json                  a finished unit's result, written last and atomically
    logs/<kind>-<key>.log                    what a unit printed

Every unit runs as a Ray task that reserves no CPU itself: the distillation actors and the Ray Train workers it
starts reserve theirs, so Ray packs units onto the machine's cores and a unit waits while they are busy. An eval
unit reserves every CPU (``eval.exclusive``) so that its timing is not disturbed by a neighbour (``pick_units``
says what may use a core while it waits). A killed grid
resumes where it stopped: finished units have their markers, and an interrupted student resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import RunError
from trainers.online import needs_online_teacher

from .grid import GridSpec, Inputs, Unit, content_key, expand
from .records import ResultRow

UNIT_DIR, LOG_DIR = "units", "logs"


class GridError(RunError):
    """Units of a grid failed (each named with its log); the finished ones are kept and reused on a re-run."""

    prefix = ""


@dataclass(frozen=True)
class Paths:
    """Where a grid's inputs are (slices already cut) and where the shared cache is."""

    cache: Path
    teacher: Path
    train: Path
    valid: Path
    test: Path
    teacher_hf: Path | None = None  # for okd / on_policy students


@dataclass
class GridRun:
    """What one ``run_grid`` call did."""

    units: list[Unit]
    reused: list[str] = field(default_factory=list)  # unit names found finished in the cache
    ran: list[str] = field(default_factory=list)  # unit names run (and finished) by this call
    failed: dict[str, str] = field(default_factory=dict)  # unit name -> error
    blocked: list[str] = field(default_factory=list)  # not run: a unit they need failed
    rows: list[ResultRow] = field(default_factory=list)


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def marker_path(cache: Path, unit: Unit) -> Path:
    return cache / UNIT_DIR / f"{unit.name}.json"


def read_marker(cache: Path, unit: Unit) -> dict | None:
    path = marker_path(cache, unit)
    return json.loads(path.read_text()) if path.is_file() else None


def _has_output(unit: Unit, marker: dict) -> bool:
    """Whether a finished unit's output is still on disk: an eval unit's result is its marker; a dataset or a
    student lives beside it and is gone when the marker came from a results directory (another machine)."""
    if unit.kind == "distill":
        return (Path(marker["store"]) / marker["dataset"]).is_dir()
    if unit.kind == "student":
        return Path(marker["model"]).is_dir()
    return True


def plan_units(units: list[Unit], markers: dict[str, dict]) -> list[Unit]:
    """The units to run: those without a marker, and the finished ones whose output a unit to run needs but
    which is no longer on disk (re-running them is exact: datasets and students are deterministic)."""
    todo = {u.key for u in units if u.key not in markers}
    by_key = {u.key: u for u in units}
    for unit in reversed(units):  # expand() lists dependencies first: dependants are seen before their needs
        if unit.key in todo:
            todo.update(k for k in unit.needs if k in markers and not _has_output(by_key[k], markers[k]))
    return [u for u in units if u.key in todo]


def import_markers(source: Path, cache: Path) -> int:
    """Copies the markers a results directory carries (``units/``) into ``cache``, where none exists yet; a
    committed results directory thus lets a fresh clone resume its grid. Returns how many were copied."""
    copied = 0
    for path in sorted((source / UNIT_DIR).glob("*.json")):
        target = cache / UNIT_DIR / path.name
        if not target.exists():
            _write_json_atomic(target, json.loads(path.read_text()))
            copied += 1
    return copied


SLICING = "spread"  # part of a slice's identity: how its rows are chosen


def _slice(src: Path, rows: int | None, out: Path) -> Path:
    """``src`` itself, or ``rows`` of its rows spread evenly over it, written once to ``out``. Evenly, not the
    first ones: a prepared split keeps the corpus order (the Bible's books), so a head would be a few books."""
    if rows is None:
        return src
    if not out.is_file():
        table = pq.read_table(src)
        n = table.num_rows
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        pq.write_table(table.take([i * n // rows for i in range(rows)]) if rows < n else table, tmp)
        tmp.replace(out)
    return out


def prepare_inputs(grid: GridSpec, cache: Path) -> tuple[Inputs, Paths]:
    """Checks the grid's inputs, cuts its slices into the cache, and computes their content identities.

    Raises:
        InputError: a missing teacher, data directory or split (named).
    """
    from pipeline.ct2 import check_model_dir, check_vocabulary, model_hash
    from pipeline.errors import InputError
    from pipeline.tokenizer import Tokenizer
    from trainers.checkpoint import file_hash

    check_model_dir(grid.teacher)
    vocab_hash = check_vocabulary(Tokenizer.load(grid.teacher), grid.teacher)
    data = bundled_data(cache) if str(grid.data) == "bundled" else grid.data
    splits = {}
    for split in ("train", "valid", "test"):
        path = data / f"{split}.parquet"
        if not path.is_file():
            raise InputError(f"grid {grid.name!r}: {path} not found (data: a `distillery data prepare` directory)")
        rows = getattr(grid, f"{split}_rows")
        source_hash = file_hash(path)
        key = content_key("slice", {"source": source_hash, "rows": rows, "slicing": SLICING})
        identity = source_hash if rows is None else f"{source_hash}:{rows}:{SLICING}"
        splits[split] = (_slice(path, rows, cache / "data" / key / f"{split}.parquet"), identity)
    teacher_hash = model_hash(grid.teacher)
    teacher_hf = None
    if any(needs_online_teacher(loss.name) for loss in grid.methods):
        teacher_hf = grid.teacher_hf or _teacher_back(grid.teacher, cache / "teachers" / f"{teacher_hash}-hf")
        if not (teacher_hf / "model.safetensors").is_file():
            raise InputError(f"grid {grid.name!r}: teacher_hf {teacher_hf} holds no model.safetensors")
    inputs = Inputs(teacher_hash=teacher_hash, vocab_hash=vocab_hash,
                    train_hash=splits["train"][1], valid_hash=splits["valid"][1], test_hash=splits["test"][1],
                    teacher_hf_hash=file_hash(teacher_hf / "model.safetensors") if teacher_hf else None)
    return inputs, Paths(cache=cache, teacher=grid.teacher, train=splits["train"][0], valid=splits["valid"][0],
                         test=splits["test"][0], teacher_hf=teacher_hf)


def _teacher_back(ct2_dir: Path, out: Path) -> Path:
    """The CTranslate2 teacher as a Hugging Face checkpoint in the cache (converted and parity-checked once)."""
    from trainers.ct2_back import save_back

    if not (out / "model.safetensors").is_file():
        save_back(ct2_dir, out)
    return out


def bundled_data(cache: Path) -> Path:
    """The bundled corpus prepared (validated, split by chapter) once into the cache; ``data: bundled``."""
    from pipeline.bundled import BUNDLED_CORPUS, BUNDLED_SPLIT, bundled_corpus_spec
    from pipeline.prepare import load_prepared, prepare
    from trainers.checkpoint import file_hash

    out = cache / "data" / ("bundled-" + file_hash(BUNDLED_CORPUS).removeprefix("sha256:")[:16])
    if load_prepared(out) is None:
        prepare(bundled_corpus_spec(), BUNDLED_SPLIT, out)
    return out


# ---- what each kind of unit does (inside a Ray task) -------------------------------------------------------


def _distill(unit: Unit, grid: GridSpec, paths: Paths, needs: dict) -> dict:
    from pipeline.run import run_job
    from pipeline.spec import JobSpec

    f, d = unit.fields, grid.distill
    noise = f["noise"]
    decoding = {"mode": f["decoding"], "max_length": f["max_length"]}
    if f["decoding"] == "beam":
        decoding |= {"beam_size": f["beam_size"]}
    if f["decoding"] == "sample":
        decoding |= {"temperature": f["temperature"]}
    spec = JobSpec.model_validate({
        "corpus": {"path": str(paths.train), "id_column": "id"},
        "teacher": {"model": str(paths.teacher), "compute_type": "int8"},
        "decoding": decoding,
        "targets": {"top_k": f["top_k"]},
        "noise": {} if noise["kind"] == "none" else {noise["kind"]: noise["rate"], "seed": f["noise_seed"]},
        "output": {"store": str(paths.cache / "datasets"), "dataset": f"d-{unit.key}", "shard_size": d.shard_size},
        "resources": {"workers": d.workers, "threads_per_worker": d.threads_per_worker},
    })
    manifest = run_job(spec)
    return {"store": str(paths.cache / "datasets"), "dataset": manifest.dataset,
            "dataset_hash": manifest.dataset_hash, "counts": manifest.counts.model_dump(mode="json")}


def _student(unit: Unit, grid: GridSpec, paths: Paths, needs: dict) -> dict:
    from trainers.loop import OptimConfig
    from trainers.losses import LossConfig
    from trainers.models import ModelSize
    from trainers.student import DatasetRef, StudentConfig, train_student

    f, s = unit.fields, grid.student
    dataset = needs[unit.needs[0]]
    cfg = StudentConfig(
        dataset=DatasetRef(store=dataset["store"], name=dataset["dataset"]),
        valid=paths.valid, test=None, tokenizer=paths.teacher, out=paths.cache / "students" / f"s-{unit.key}",
        size=ModelSize(**f["size"]), loss=LossConfig(**f["loss"]), workers=s.workers,
        teacher_hf=paths.teacher_hf if needs_online_teacher(f["loss"]["name"]) else None,
        threads_per_worker=s.threads_per_worker, bleu_sentences=s.bleu_sentences,
        # Selected by greedy valid BLEU: NLL on references is the wrong yardstick for students that learn the
        # teacher's translations. Patience is off: every student gets the same step budget.
        optim=OptimConfig(lr=s.lr, warmup_steps=s.warmup_steps, max_tokens=s.max_tokens, eval_every=s.eval_every,
                          checkpoint_every=s.eval_every, max_steps=s.steps, max_epochs=10_000, patience=10_000,
                          select_by="valid_bleu", seed=f["seed"]),
    )
    results = train_student(cfg)
    return {"run": str(cfg.out), "model": str(cfg.out / "ct2"), "trajectory": _trajectory(cfg.out)} | {
        k: results[k] for k in ("parameters", "steps", "train_minutes", "selected_step", "selected_valid_bleu",
                                "stopped", "gate")}


TRAJECTORY_KEYS = ("step", "valid_loss", "valid_bleu", "gate", "ffn_open", "ffn_expected_open", "teacher_valid_loss")


def _trajectory(run: Path) -> list[dict]:
    """The student's validations (what the report's trajectory tables read): step, NLL, BLEU and, where the
    student has them, its hybrid gate, kept FFN fraction and OKD teacher's NLL — the last record of each step (a
    resumed run validates again where it stopped)."""
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "valid":
            by_step[record["step"]] = {k: record[k] for k in TRAJECTORY_KEYS if record.get(k) is not None}
    return [by_step[s] for s in sorted(by_step)]


def _eval(unit: Unit, grid: GridSpec, paths: Paths, needs: dict) -> dict:
    from pipeline.evaluate import score, translate
    from pipeline.tokenizer import Tokenizer

    model = paths.teacher if unit.fields["model"] == "teacher" else Path(needs[unit.needs[0]]["model"])
    test = pq.read_table(paths.test, columns=["source", "target"])
    speed: dict = {}
    hyps = translate(model, Tokenizer.load(model), test["source"].to_pylist(), beam_size=grid.eval.beam_size,
                     threads=grid.eval.threads, speed=speed)
    scores = score(hyps, test["target"].to_pylist())
    out = paths.cache / "evals" / f"{unit.name}.hyp.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    return scores.as_dict() | {"speed": speed, "hypotheses": str(out)}


RUNNERS = {"distill": _distill, "student": _student, "eval": _eval}


def _run_unit(unit: Unit, grid_json: str, paths: Paths, *needs: dict) -> dict:
    """Runs one unit with its output captured in its log; writes its marker last. Never raises: an error
    comes back as ``{"error": …}`` so the driver can report it and carry on with the independent units."""
    grid = GridSpec.model_validate_json(grid_json)
    log = paths.cache / LOG_DIR / f"{unit.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    by_key = {key: result for key, result in zip(unit.needs, needs, strict=True)}
    if any("error" in result for result in needs):
        return {"error": "blocked"}  # a unit it needs failed; that failure is reported once, by that unit
    started = time.monotonic()
    with open(log, "a", encoding="utf-8") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            result = RUNNERS[unit.kind](unit, grid, paths, by_key)
        except BaseException as exc:  # noqa: BLE001 — reported to the driver with the log's path
            traceback.print_exc(file=sink)
            from pipeline.errors import message

            return {"error": f"{message(exc)} (log: {log})"}
    result |= {"unit": unit.name, "fields": unit.fields, "coords": unit.coords,
               "seconds": round(time.monotonic() - started, 1)}
    _write_json_atomic(marker_path(paths.cache, unit), result)
    return result


def teacher_parameters(grid: GridSpec) -> int:
    """The teacher's parameter count: the grid's ``teacher_parameters``, else the teacher's model_info.json."""
    if grid.teacher_parameters:
        return grid.teacher_parameters
    info = grid.teacher / "model_info.json"
    return int(json.loads(info.read_text())["parameters"]) if info.is_file() else 0


def result_rows(grid: GridSpec, units: list[Unit], results: dict[str, dict]) -> list[ResultRow]:
    """One row per finished eval unit (the teacher's first), with its grid coordinates."""
    teacher = next((results.get(u.key) for u in units if u.kind == "eval" and u.fields["model"] == "teacher"), None)
    by_key = {u.key: u for u in units}
    rows = []
    for unit in units:
        if unit.kind != "eval" or unit.key not in results:
            continue
        r, c = results[unit.key], unit.coords
        common = {"grid": grid.name, "bleu": r["bleu"], "chrf": r["chrf"], "test_sentences": r["sentences"],
                  "sentences_per_s": r["speed"]["sentences_per_s"], "tokens_per_s": r["speed"]["tokens_per_s"],
                  "threads": r["speed"]["threads"], "teacher_bleu": teacher["bleu"] if teacher else None}
        if c["kind"] == "teacher":
            rows.append(ResultRow(kind="teacher", unit=unit.key, method="teacher", size="teacher",
                                  parameters=teacher_parameters(grid), decoding="beam", **common))
            continue
        student = results.get(unit.needs[0], {})
        rows.append(ResultRow(kind="student", unit=by_key[unit.needs[0]].key, method=c["method"], size=c["size"],
                              parameters=student.get("parameters", 0), noise_kind=c["noise_kind"],
                              noise_rate=c["noise_rate"], decoding=c["decoding"], seed=c["seed"],
                              steps=student.get("steps", 0), train_minutes=student.get("train_minutes", 0.0),
                              **common))
    rows.sort(key=lambda r: (r.kind != "teacher", r.method, r.parameters, r.noise_kind, r.noise_rate, r.decoding,
                             r.seed))
    return rows


def run_grid(grid: GridSpec, *, cache: Path, address: str | None = None, on_update=None,
             execute: bool = True) -> GridRun:
    """Runs every unit of ``grid`` that has no marker in ``cache``, in dependency order, on Ray.

    Args:
        cache: the unit cache (shared between grids).
        address: Ray cluster (default ``RAY_ADDRESS`` or an embedded local Ray).
        on_update: called as ``on_update(run, running)`` whenever a unit starts or ends (progress display);
            ``running`` names the units running now (the others wait for their inputs or for CPUs).
        execute: False runs nothing: the rows are those of the units already finished (a partial grid).

    Returns:
        What was reused, run, failed or blocked, and the result rows of every finished eval unit.
    """
    import ray

    from pipeline.run import init_ray

    cache = cache.resolve()
    inputs, paths = prepare_inputs(grid, cache)
    paths = Paths(**{k: None if v is None else Path(v).resolve() for k, v in paths.__dict__.items()})
    units = expand(grid, inputs)
    run = GridRun(units=units)
    results: dict[str, dict] = {}
    for unit in units:
        if (marker := read_marker(cache, unit)) is not None:
            results[unit.key] = marker
    todo = plan_units(units, results)
    for unit in todo:
        results.pop(unit.key, None)
    run.reused = [u.name for u in units if u.key in results]
    if not todo or not execute:
        run.rows = result_rows(grid, units, results)
        return run

    init_ray(address)
    remote = ray.remote(_run_unit)
    grid_json = grid.model_dump_json()
    all_cpus = int(ray.cluster_resources().get("CPU", 1))
    # Units start in order (pick_units), when their inputs are finished and their CPUs are free — not all at
    # once: a student submitted early would sit in Ray holding a worker process (torch loaded) until its trainer
    # got CPUs, and the trainers would take them in any order, so an interrupted grid would hold no whole seed.
    queue = sorted(todo, key=lambda u: u.coords.get("seed") or 0)  # stable: dependencies still come first
    running: dict[ray.ObjectRef, Unit] = {}
    started: dict[str, float] = {}  # unit key -> when it started (monotonic): what a backfill may fill
    by_key = {u.key: u for u in units}
    free, lost = all_cpus, set()  # lost: keys of units that failed or were blocked
    if on_update:
        on_update(run, [])
    while queue or running:
        start, blocked = pick_units(queue, done=set(results), lost=lost, running=len(running), free=free,
                                    cpus_needed=lambda u: _cpus_needed(u, grid, all_cpus),
                                    exclusive_eval=grid.eval.exclusive,
                                    fits_wait=_fits_wait(list(running.values()), started, results, by_key))
        for unit in blocked:
            queue.remove(unit)
            run.blocked.append(unit.name)
            lost.add(unit.key)
        for unit in start:
            queue.remove(unit)
            free -= _cpus_needed(unit, grid, all_cpus)
            cpus = all_cpus if unit.kind == "eval" and grid.eval.exclusive else 0  # the trainers hold their own
            ref = remote.options(num_cpus=cpus, max_retries=0, name=unit.name).remote(
                unit, grid_json, paths, *(results[k] for k in unit.needs))
            running[ref] = unit
            started[unit.key] = time.monotonic()
        if on_update:
            on_update(run, [u.name for u in running.values()])
        if not running:
            if queue:  # a program error, not a user's: expand() puts every needed unit in the grid, inputs first
                raise RuntimeError(f"{queue[0].name} waits on a unit that is neither finished nor queued")
            continue
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            unit = running.pop(ref)
            free += _cpus_needed(unit, grid, all_cpus)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the task itself died (e.g. its worker was killed)
                result = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            if "error" not in result:
                results[unit.key] = result
                run.ran.append(unit.name)
            else:
                run.failed[unit.name] = result["error"]
                lost.add(unit.key)
    run.rows = result_rows(grid, units, results)
    return run


def pick_units(queue: list[Unit], *, done: set[str], lost: set[str], running: int, free: int,
               cpus_needed, exclusive_eval: bool, fits_wait=None) -> tuple[list[Unit], list[Unit]]:
    """The units of ``queue`` (in order: seeds ascending, inputs first) to start now, and those blocked for good.

    A unit starts when its inputs are ``done`` and its CPUs are ``free``. A unit whose input failed (``lost``) is
    blocked. A unit that waits for CPUs holds back every later seed (so an interrupted grid holds whole seeds);
    units of its own seed may use the free CPUs meanwhile. An exclusive evaluation (timed on an idle machine)
    that is ready **drains** the machine: nothing else starts until the running units end and it has run. Left
    waiting instead, it would run only after the last student (students keep a core busy at all times), and an
    interrupted grid — a session's end — would lose every student that finished without its evaluation: the
    student's model lives in the cache, which the next machine does not have. Draining costs the running units'
    difference in length on the freed cores; a grid's paired students (one seed, one budget) end together, but
    students of different methods need not (a reverse-KL student takes 12 minutes, an on-policy one 40). So while
    an evaluation waits, a later unit that ``fits_wait(unit)`` — expected to end before the running units do
    (``_fits_wait``) — may still take a free core (a backfill); every other unit, and every evaluation, waits.
    """
    start, blocked, free = [], [], free
    waiting_seed, draining = None, False
    for unit in queue:
        if any(k in lost for k in unit.needs) or any(b.key in unit.needs for b in blocked):
            blocked.append(unit)
            continue
        if any(k not in done for k in unit.needs):
            continue  # an input is still running: later units may start meanwhile
        if unit.kind == "eval" and exclusive_eval and (running or start):
            draining = True  # drain: it starts when nothing runs
            continue
        if draining and not (fits_wait is not None and running and fits_wait(unit)):
            continue  # only a backfill that ends before the running units may start meanwhile
        seed = unit.coords.get("seed") or 0
        if waiting_seed is not None and seed > waiting_seed:
            break
        need = cpus_needed(unit)
        if need > free and (running or start):
            waiting_seed = seed if waiting_seed is None else waiting_seed
            continue
        start.append(unit)
        free -= need
    return start, blocked


def _shape(unit: Unit) -> tuple:
    """What makes units alike in duration: their kind and grid coordinates but the seed."""
    return unit.kind, tuple(sorted((k, str(v)) for k, v in unit.coords.items() if k != "seed"))


def _fits_wait(running: list[Unit], started: dict[str, float], finished: dict[str, dict], units: dict[str, Unit]):
    """``unit -> bool``: whether ``unit`` is expected to end before every running unit has, judged by the longest
    duration (a marker's ``seconds``) of a ``finished`` unit of the same shape (e.g. the same method's student of
    another seed). Without an estimate for a running unit or for the candidate: False (no backfill)."""
    took: dict[tuple, float] = {}
    for key, marker in finished.items():
        if key in units and "seconds" in marker:
            shape = _shape(units[key])
            took[shape] = max(took.get(shape, 0.0), float(marker["seconds"]))
    left = [took.get(_shape(u)) for u in running]
    if not running or any(t is None for t in left):
        return lambda unit: False
    now = time.monotonic()
    window = max(t - (now - started[u.key]) for t, u in zip(left, running, strict=True))
    return lambda unit: took.get(_shape(unit), math.inf) <= window


def _cpus_needed(unit: Unit, grid: GridSpec, all_cpus: int) -> int:
    """The CPUs a unit keeps busy: a student its trainers'; a distillation runs a Ray Data pipeline over the
    cluster, an exclusive eval reserves it."""
    if unit.kind == "student":
        need = grid.student.workers * grid.student.threads_per_worker
    elif unit.kind == "eval":
        need = all_cpus if grid.eval.exclusive else grid.eval.threads
    else:
        need = all_cpus
    return min(need, all_cpus)


def write_outputs(grid: GridSpec, run: GridRun, out: Path, *, cache: Path, command: str) -> list[Path]:
    """results.csv, results.md and the plots of a grid run, in ``out`` (the report module renders them), and
    the markers of its finished units in ``out/units/``."""
    from . import report

    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(run.rows, out / "results.csv")
    for unit in run.units:  # the finished units' markers travel with the results (import_markers)
        if (marker := read_marker(cache, unit)) is not None:
            _write_json_atomic(out / UNIT_DIR / f"{unit.name}.json", marker)
    names = {unit.name for unit in run.units}
    for path in (out / UNIT_DIR).glob("*.json"):
        if path.stem not in names:  # a unit the grid no longer has (a changed setting): git keeps its history
            path.unlink()
    if run.rows:  # nothing evaluated yet (every unit failed): the failures are what the caller reports
        report.write_markdown(run.rows, out / "results.md", title=f"Grid {grid.name}", command=command,
                              units_dir=out / UNIT_DIR)
    (out / "units.json").write_text(json.dumps({
        "reused": run.reused, "ran": run.ran, "failed": run.failed, "blocked": run.blocked,
        "units": [{"name": u.name, "kind": u.kind, "coords": u.coords} for u in run.units]}, indent=2))
    return sorted(p for p in out.iterdir() if p.is_file())


def default_cache() -> Path:
    return Path(os.environ.get("DISTILLERY_EXPERIMENT_CACHE", "work/experiments/cache"))
