"""``make demo``: the main job end to end on the bundled corpus, every step skipped when already done.

corpus → validated splits → shared tokenizer → teacher → CTranslate2 → BLEU on the held-out test split
→ two distilled datasets on the embedded local Ray (teacher-forced top-k along the references; the teacher's
beam-search translations with their own top-k) → four students (nll / token / sentence / hybrid) on Ray
Train, each exported to CTranslate2 and scored on the same test split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

# Teacher settings for a 2-core CPU: a step budget, not the epochs, ends training (see README, "Demo").
DEMO_VOCAB = 8000
DEMO_LR = 7e-4
STEPS = 8
# Which dataset each student loss trains on: token KD on distributions along the references, sentence KD
# and the hybrid on the teacher's own translations (research.md: Kim & Rush; the gated hybrid).
STUDENT_DATASETS = {"nll": "teacher_forcing", "token": "teacher_forcing", "sentence": "beam", "hybrid": "beam"}


def _step(console: Console, name: str, done: bool) -> bool:
    console.print(f"[bold]{name}[/] " + ("[dim](done, reused)[/]" if done else "…"))
    return not done


def run_demo(workdir: Path, *, teacher_steps: int, teacher_size: str, student_steps: int,
             student_size: str, console: Console, teacher_minutes: float | None = None) -> dict:
    """Runs (or resumes) the demo in ``workdir``; returns and prints the results table."""
    from pipeline.bundled import BUNDLED_SPLIT, bundled_corpus_spec
    from pipeline.evaluate import record_evaluation, score, translate
    from pipeline.prepare import load_prepared, prepare
    from pipeline.run import plan_job, run_job
    from pipeline.tokenizer import Tokenizer, train_tokenizer
    from trainers.export import export_ct2
    from trainers.student import train_student
    from trainers.teacher import train_teacher

    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, tok_dir = workdir / "data", workdir / "tokenizer"
    teacher_run, teacher_ct2 = workdir / "teacher", workdir / "teacher-ct2"

    prepared = load_prepared(data_dir)
    if _step(console, f"1/{STEPS} corpus: validate and split the bundled de→en Bible", prepared is not None):
        prepared = prepare(bundled_corpus_spec(), BUNDLED_SPLIT, data_dir)
    console.print("    " + ", ".join(f"{k} {v:,}" for k, v in prepared.counts.items()))

    if _step(console, f"2/{STEPS} tokenizer: shared Unigram vocabulary", (tok_dir / "tokenizer.json").is_file()):
        train = pq.read_table(prepared.path("train"), columns=["source", "target"])
        train_tokenizer(train.column("source").to_pylist() + train.column("target").to_pylist(), tok_dir,
                        vocab_size=DEMO_VOCAB)
    tokenizer = Tokenizer.load(tok_dir)

    cfg = demo_teacher_config(workdir, prepared, size=teacher_size, steps=teacher_steps, minutes=teacher_minutes)
    started = time.monotonic()
    cap = f", capped at {teacher_minutes:g} min" if teacher_minutes else ""
    console.print(f"[bold]3/{STEPS} teacher[/]: Marian '{teacher_size}', {teacher_steps:,} steps{cap} (resumes)")
    state = train_teacher(cfg)
    console.print(f"    {state.finished}: {state.step} steps, best valid loss {state.best_valid:.3f}")

    best_mtime = (teacher_run / "best" / "model.safetensors").stat().st_mtime
    exported = (teacher_ct2 / "model.bin").is_file() and (teacher_ct2 / "model.bin").stat().st_mtime > best_mtime
    if _step(console, f"4/{STEPS} export: CTranslate2 int8", exported):
        export_ct2(teacher_run / "best", teacher_ct2, quantization="int8")

    console.print(f"[bold]5/{STEPS} evaluate[/]: beam 4 on the held-out test split")
    test = pq.read_table(prepared.path("test"), columns=["source", "target"])
    sources, refs = test.column("source").to_pylist(), test.column("target").to_pylist()
    hyps = translate(teacher_ct2, tokenizer, sources, beam_size=4)
    (workdir / "teacher.test.hyp.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    teacher = score(hyps, refs)
    baseline = score(sources, refs)  # trivial baseline: copy the German source
    # Recorded next to the model, as `distillery eval` does: the distillations below warn if the teacher is weaker.
    record_evaluation(teacher_ct2, test=str(prepared.path("test")), model=teacher, copy_baseline=baseline, beam_size=4)

    results = {
        "teacher": {**teacher.as_dict(), "steps": state.step, "train_minutes": round(state.elapsed_s / 60, 1),
                    "parameters": json.loads((teacher_run / "model_info.json").read_text())["parameters"]},
        "copy_source_baseline": baseline.as_dict(),
    }
    console.print(f"    BLEU {teacher.bleu:.2f}, chrF {teacher.chrf:.2f} (copy-source baseline: BLEU "
                  f"{baseline.bleu:.2f}, chrF {baseline.chrf:.2f})")

    datasets = {}
    for step, (mode, what) in enumerate([("teacher_forcing", "teacher-forced top-8 along the references"),
                                         ("beam", "beam-4 translations + their teacher-forced top-8")], start=6):
        console.print(f"[bold]{step}/{STEPS} distill[/]: {what}, training split (local Ray)")
        spec = demo_distill_spec(workdir, prepared.path("train"), teacher_ct2, mode)
        plan = plan_job(spec)
        for warning in plan.warnings:
            console.print(f"    [bold yellow]warning:[/] {warning}", highlight=False)
        manifest = run_job(spec, plan=plan)
        counts = manifest.counts
        console.print(f"    {counts.examples:,} examples, {counts.target_tokens:,} target tokens, "
                      f"{counts.bytes / counts.target_tokens:.1f} bytes/token, {len(manifest.shards)} "
                      f"shards → {workdir / 'datasets' / manifest.dataset}")
        datasets[mode] = manifest.dataset
        results.setdefault("distilled", {})[mode] = {
            "dataset": str(workdir / "datasets" / manifest.dataset), "counts": counts.model_dump(mode="json"),
            "dataset_hash": manifest.dataset_hash}
    (workdir / "results.json").write_text(json.dumps(results, indent=2))

    console.print(f"[bold]8/{STEPS} students[/]: Marian '{student_size}' with nll / token / sentence / hybrid, "
                  f"{student_steps} steps each (Ray Train, resumes)")
    results["students"] = {}
    for loss, mode in STUDENT_DATASETS.items():
        cfg = demo_student_config(workdir, prepared, datasets[mode], loss, size=student_size, steps=student_steps)
        student = train_student(cfg)  # returns the saved results when this exact student is done
        console.print(f"    {loss:<8} BLEU {student['bleu']:.2f}  chrF {student['chrf']:.2f}  "
                      f"({student['steps']} steps, {student['stopped']}; selected valid BLEU "
                      f"{student['selected_valid_bleu']:.2f} at step {student['selected_step']})")
        results["students"][loss] = student | {"dataset": datasets[mode]}
    results["wall_minutes_this_run"] = round((time.monotonic() - started) / 60, 1)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    Console().print(results_table(results, teacher_size=teacher_size, student_size=student_size))
    console.print(f"signature: {teacher.bleu_signature}")
    console.print(f"results → {workdir / 'results.json'}")
    return results


def results_table(results: dict, *, teacher_size: str, student_size: str) -> Table:
    """The demo's closing table: every system on the same test split, beam 4, CT2 int8."""
    teacher = results["teacher"]
    table = Table(title=f"de→en Bible test split ({teacher['sentences']:,} verses), CT2 int8, beam 4")
    for col in ("system", "trained on", "params", "BLEU", "chrF", "selected at", "train time"):
        table.add_column(col, justify="left" if col in ("system", "trained on") else "right")
    base = results["copy_source_baseline"]
    table.add_row("copy source (trivial baseline)", "-", "-", f"{base['bleu']:.2f}", f"{base['chrf']:.2f}", "-", "-")
    table.add_row(f"teacher ({teacher_size})", "references", f"{teacher['parameters'] / 1e6:.1f}M",
                  f"{teacher['bleu']:.2f}", f"{teacher['chrf']:.2f}", "valid loss",
                  f"{teacher['train_minutes']:.1f} min")
    sources = {"nll": "references", "token": "teacher top-8 on refs", "sentence": "teacher beam output",
               "hybrid": "beam output + its top-8"}
    for loss, s in results["students"].items():
        table.add_row(f"student ({student_size}) {loss}", sources[loss], f"{s['parameters'] / 1e6:.1f}M",
                      f"{s['bleu']:.2f}", f"{s['chrf']:.2f}", f"step {s['selected_step']:,} / {s['steps']:,}",
                      f"{s['train_minutes']:.1f} min")
    return table


def demo_teacher_config(workdir: Path, prepared, *, size: str, steps: int, minutes: float | None = None):
    """The demo's teacher: a step budget, so the same command gives the same teacher on a busy machine as on an
    idle one (a wall-clock budget gave 859 steps on one run and 1,074 on another); ``minutes`` is an optional cap."""
    from trainers.loop import OptimConfig
    from trainers.teacher import TeacherConfig

    return TeacherConfig(
        train=prepared.path("train"), valid=prepared.path("valid"), tokenizer=workdir / "tokenizer",
        out=workdir / "teacher", size=size,
        # Chosen by measurement on 2 cores (README, "Demo"): small batches learn fastest per CPU minute; a
        # peak rate of 2e-3 collapsed the post-LN encoder (the decoder then ignored the source), 7e-4 did not.
        optim=OptimConfig(lr=DEMO_LR, warmup_steps=200, max_tokens=3000, eval_every=400, checkpoint_every=200,
                          max_steps=steps, max_minutes=minutes),
    )


def demo_distill_spec(workdir: Path, train: Path, teacher: Path, mode: str = "teacher_forcing"):
    """The demo's distillation jobs: the same spec a user would write in YAML. The dataset name carries
    the teacher's hash, so a retrained teacher gets a new dataset instead of a refused re-run."""
    from pipeline.ct2 import model_hash
    from pipeline.spec import JobSpec

    name = f"bible-{mode.replace('_', '-')}-{model_hash(teacher).removeprefix('sha256:')[:8]}"
    decoding = {"mode": mode} | ({"beam_size": 4, "num_hypotheses": 1} if mode == "beam" else {})
    return JobSpec.model_validate({
        "corpus": {"path": str(train), "id_column": "id"},
        "teacher": {"model": str(teacher), "compute_type": "int8"},
        "decoding": decoding,
        "targets": {"top_k": 8},
        "output": {"store": str(workdir / "datasets"), "dataset": name, "shard_size": 2000},
        # On 2 cores two single-threaded translators outrun one with two threads (bench/pipeline_throughput.py).
        "resources": {"workers": 2, "threads_per_worker": 1},
    })


def demo_student_config(workdir: Path, prepared, dataset: str, loss: str, *, size: str, steps: int):
    """One demo student: same size, step budget and optimiser for every loss; only the loss and its data
    differ. A step budget (not minutes) keeps the comparison fair on a machine that is busy with other work."""
    from trainers.loop import OptimConfig
    from trainers.losses import LossConfig
    from trainers.student import DatasetRef, StudentConfig

    return StudentConfig(
        dataset=DatasetRef(store=str(workdir / "datasets"), name=dataset),
        valid=prepared.path("valid"), test=prepared.path("test"), tokenizer=workdir / "tokenizer",
        out=workdir / "students" / f"{loss}-{dataset.rsplit('-', 1)[-1]}", size=size, loss=LossConfig(name=loss),
        workers=1, threads_per_worker=2,
        # Every student is selected (and early-stopped) by greedy BLEU on the valid split: NLL on the references
        # is the wrong yardstick for students that learn the teacher's translations instead of the references.
        optim=OptimConfig(lr=DEMO_LR, warmup_steps=200, max_tokens=3000, eval_every=200, checkpoint_every=200,
                          max_steps=steps, select_by="valid_bleu"),
    )
