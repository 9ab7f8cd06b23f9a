"""The experiment report over constructed ResultRows: CSV round trip, aggregation and CIs (against textbook t values
and hand computations), results.md tables parsed back, plots, claims and docs/RESULTS.md. Fast: no Ray, no model."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
from PIL import Image

from distillery.experiment.claims import TITLES, Verdict, evaluate_claims
from distillery.experiment.records import CSV_COLUMNS, ResultRow
from distillery.experiment.report import read_csv, write_csv, write_markdown, write_results_doc
from distillery.experiment.stats import aggregate, contrast, mean_ci, t_quantile
from pipeline.errors import InputError

SIZES = {"tiny": 1_000_000, "small": 2_000_000, "mini": 4_000_000}
TEACHER = dict(size="base", parameters=8_000_000, bleu=20.0, sentences_per_s=10.0)


def student(method="token", size="tiny", seed=1, bleu=10.0, *, grid="g", noise=("none", 0.0), decoding=None,
            speed=None, **extra) -> ResultRow:
    decoding = decoding or {"token": "teacher_forcing", "nll": "references"}.get(method, "beam")
    return ResultRow(grid=grid, kind="student", unit=f"{method}-{size}-{noise}-{decoding}-{seed}", method=method,
                     size=size, parameters=SIZES[size], noise_kind=noise[0], noise_rate=noise[1], decoding=decoding,
                     seed=seed, bleu=bleu, chrf=bleu + 20, test_sentences=50,
                     sentences_per_s=speed or 8e7 / SIZES[size], tokens_per_s=2e9 / SIZES[size], threads=2,
                     **{"teacher_bleu": TEACHER["bleu"], **extra})


def teacher(grid="g", bleu=TEACHER["bleu"]) -> ResultRow:
    return ResultRow(grid=grid, kind="teacher", unit="teacher", method="teacher", size=TEACHER["size"],
                     parameters=TEACHER["parameters"], decoding="beam", bleu=bleu, chrf=45.0, test_sentences=50,
                     sentences_per_s=TEACHER["sentences_per_s"], tokens_per_s=250.0, threads=2, teacher_bleu=bleu)


def seeds(method, size, values, **kw) -> list[ResultRow]:
    return [student(method, size, seed, bleu, **kw) for seed, bleu in enumerate(values, start=1)]


def tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every pipe table of a markdown text, as lists of {header: cell}."""
    found, block = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            header, body = block[0], block[2:]
            found.append([dict(zip(header, row, strict=True)) for row in body])
            block = []
    return found


def ci_cell(cell: str) -> tuple[float, float | None, int]:
    """``12.34 ± 0.56 (3)`` → (12.34, 0.56, 3); ``± n/a`` → None."""
    m = re.fullmatch(r"(-?[\d.]+) ± (n/a|[\d.]+) \((\d+)\)", cell)
    assert m, cell
    return float(m[1]), None if m[2] == "n/a" else float(m[2]), int(m[3])


# --- CSV -----------------------------------------------------------------------------------------------------


def test_csv_round_trip_is_exact(tmp_path):
    rows = [teacher(), student(bleu=0.1 + 0.2, train_minutes=1 / 3, steps=700),
            student("sentence", "mini", 2, 1e-17, noise=("swap", 0.15)),
            student(speed=123.456789012345, teacher_bleu=None)]
    path = write_csv(rows, tmp_path / "results.csv")
    with open(path, newline="") as f:
        assert tuple(next(csv.reader(f))) == CSV_COLUMNS
    assert read_csv(path) == rows
    assert read_csv(path)[3].teacher_bleu is None
    assert not list(tmp_path.glob(".*tmp"))


def test_read_csv_refuses_other_columns_and_lists_every_bad_row(tmp_path):
    path = write_csv([student(), student(seed=2)], tmp_path / "results.csv")
    lines = path.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], lines[1].replace(",10.0,", ",ten,", 1), lines[2] + ",extra"]) + "\n")
    with pytest.raises(InputError) as err:
        read_csv(bad)
    assert "bad.csv:2: bleu" in str(err.value) and f"bad.csv:3: {len(CSV_COLUMNS) + 1} fields" in str(err.value)
    (tmp_path / "cols.csv").write_text("grid,bleu\ng,1\n")
    with pytest.raises(InputError, match="expected the columns"):
        read_csv(tmp_path / "cols.csv")


# --- aggregation and CIs --------------------------------------------------------------------------------------


def test_aggregation_groups_by_every_coordinate_but_seed():
    rows = [teacher(), *seeds("token", "tiny", [10, 12, 14]), *seeds("token", "small", [20, 22]),
            *seeds("sentence", "tiny", [5, 6, 7]), *seeds("sentence", "tiny", [1, 2, 3], decoding="greedy"),
            *seeds("sentence", "tiny", [4, 4, 4], noise=("deletion", 0.1)),
            student("sentence", "tiny", 1, 5)]  # the same unit again: counted once
    aggs = {(a.kind, a.method, a.size, a.decoding, a.noise_rate): a for a in aggregate(rows)}
    assert len(aggs) == 6 == len(aggregate(rows))
    assert aggs["student", "token", "tiny", "teacher_forcing", 0].n == 3
    assert aggs["student", "token", "small", "teacher_forcing", 0].stat("bleu").mean == 21
    assert aggs["student", "sentence", "tiny", "greedy", 0].stat("bleu").mean == 2
    assert aggs["student", "sentence", "tiny", "beam", 0.1].seeds == (1, 2, 3)
    assert aggs["teacher", "teacher", "base", "beam", 0].n == 1
    share = aggs["student", "token", "tiny", "teacher_forcing", 0].stat("bleu_share")
    assert share.mean == pytest.approx(12 / 20)
    clash = student("sentence", "tiny", 1, 5).model_copy(update={"unit": "another"})
    with pytest.raises(ValueError, match="two results"):
        aggregate([*rows, clash])


def test_a_learned_width_keeps_its_seeds_in_one_group_with_their_mean_parameter_count():
    """A gated student (ffn_gates) is pruned to another parameter count per seed: still one grid point."""
    rows = [student("token", "tiny", seed, 10.0 + seed).model_copy(update={"parameters": params, "size": "g"})
            for seed, params in ((1, 500_000), (2, 520_000), (3, 530_001))]
    (agg,) = aggregate(rows)
    assert (agg.n, agg.parameters, agg.size) == (3, 516_667, "g")


@pytest.mark.parametrize("df,textbook", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_t_quantile_matches_the_textbook_table(df, textbook):
    assert t_quantile(df) == pytest.approx(textbook, abs=5e-4)


def test_ci_of_a_small_sample_by_hand():
    # 10, 12, 14: mean 12, s = 2, half-width = t(0.975, 2) · 2 / √3 = 4.303 · 1.1547 = 4.968.
    stat = aggregate(seeds("token", "tiny", [10, 12, 14]))[0].stat("bleu")
    assert (stat.mean, stat.n) == (12, 3)
    assert stat.half == pytest.approx(4.303 * 2 / math.sqrt(3), abs=1e-3)
    # Paired over the same seeds: differences 1, 2, 2 → mean 5/3, s = √(1/3), half = 4.303 · √(1/3) / √3.
    a, b = aggregate(seeds("token", "tiny", [10, 12, 14]) + seeds("sentence", "tiny", [9, 10, 12]))
    diff = contrast([(1, a), (-1, b)])
    assert diff.paired and diff.mean == pytest.approx(5 / 3)
    assert diff.half == pytest.approx(4.303 / 3, abs=1e-3)
    # Independent (other seeds): Welch. Variance 4/3 + (20/3)/4 = 3, df = 9 / ((4/3)²/2 + (5/3)²/3) ≈ 4.96, so
    # t lies between the table's t(5) = 2.571 and t(4) = 2.776.
    c = aggregate([student("nll", "tiny", s, v) for s, v in zip([4, 5, 6, 7], [2, 4, 6, 8], strict=True)])[0]
    welch = contrast([(1, c), (-1, a)])
    assert not welch.paired and welch.mean == pytest.approx(5 - 12)
    assert 2.571 * math.sqrt(3) < welch.half < 2.776 * math.sqrt(3)


def test_one_seed_has_an_undefined_ci_not_zero(tmp_path):
    assert mean_ci([3.0]).half is None
    assert aggregate([student(bleu=7.5)])[0].stat("bleu").half is None
    md = write_markdown([teacher(), student(bleu=7.5)], tmp_path / "results.md", title="t", command="c").read_text()
    main = next(t for t in tables(md) if t and "% of teacher BLEU" in t[0])
    assert ci_cell(main[0]["BLEU ± 95 % CI (seeds)"]) == (7.5, None, 1)
    assert "n/a" in md and "7.50 ± 0.00" not in md


# --- results.md and plots ---------------------------------------------------------------------------------------


def capacity_grid(grid="g") -> list[ResultRow]:
    rows = [teacher(grid)]
    for size, base in (("tiny", 10), ("small", 14), ("mini", 17)):
        rows += seeds("token", size, [base, base + 2, base + 4], grid=grid)
        rows += seeds("sentence", size, [base - 1, base, base + 1], grid=grid)
        rows += seeds("sentence", size, [base - 3, base - 2, base - 1], grid=grid, decoding="greedy")
        for rate, drop in ((0.1, 1), (0.3, 3)):
            rows += seeds("token", size, [base - 2 * drop, base - 2 * drop + 1, base - 2 * drop + 2], grid=grid,
                          noise=("deletion", rate))
    return rows


def test_markdown_tables_hold_the_aggregated_numbers(tmp_path):
    md_path = write_markdown(capacity_grid(), tmp_path / "results.md", title="Capacity",
                             command="distillery experiment experiments/capacity.yaml")
    md = md_path.read_text()
    assert md.splitlines()[0].startswith("Regenerate this file with `distillery experiment experiments/capacity.yaml`")
    teacher_t, main, decoding = [t for t in tables(md) if t][:3]
    assert teacher_t[0]["params"] == "8.00M" and ci_cell(teacher_t[0]["BLEU ± 95 % CI (seeds)"]) == (20, None, 1)

    row = next(r for r in main if (r["method"], r["size"], r["noise"]) == ("token", "small", "clean"))
    mean, half, n = ci_cell(row["BLEU ± 95 % CI (seeds)"])
    assert (mean, n) == (16, 3) and half == pytest.approx(4.303 * 2 / math.sqrt(3), abs=0.006)
    assert row["params"] == "2.00M" and row["decoding"] == "teacher_forcing"
    assert row["% of teacher BLEU"] == "80.0 %"  # 16 / 20
    assert row["sentences/s"] == "40.0" and row["speed-up vs teacher"] == "4.00×"  # 8e7 / 2e6 = 40 vs 10
    noisy = next(r for r in main if (r["method"], r["size"], r["noise"]) == ("token", "mini", "deletion 0.3"))
    assert ci_cell(noisy["BLEU ± 95 % CI (seeds)"])[0] == 12  # 17 - 6 + 1
    assert len(main) == 3 * 5  # 3 sizes × (token clean, deletion 0.1, 0.3; sentence beam, greedy)
    sentence_tiny = next(r for r in decoding if (r["method"], r["size"], r["noise"]) == ("sentence", "tiny", "clean"))
    assert ci_cell(sentence_tiny["beam"])[0] == 10 and ci_cell(sentence_tiny["greedy"])[0] == 8
    assert sentence_tiny["teacher_forcing"] == "–"
    assert "![BLEU vs student parameters](g-bleu-vs-parameters.png)" in md
    assert "![BLEU vs noise rate](g-bleu-vs-noise.png)" in md


def test_main_table_reports_training_minutes(tmp_path):
    """What the online losses trade against quality: each group's training wall clock, mean ± CI over seeds."""
    rows = [teacher()] + [student("okd", "tiny", seed, 5.0, train_minutes=minutes)
                          for seed, minutes in ((1, 10.0), (2, 12.0), (3, 14.0))]
    md = write_markdown(rows, tmp_path / "r.md", title="t", command="c").read_text()
    (row,) = tables(md)[1]
    assert row["train min ± 95 % CI"] == "12.0 ± 5.0"  # t(0.975, 2) · 2 / √3 = 4.97


def test_plots_are_real_pngs(tmp_path):
    write_markdown(capacity_grid(), tmp_path / "results.md", title="t", command="c")
    for name in ("g-bleu-vs-parameters.png", "g-bleu-vs-noise.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.width > 500 and img.height > 300
            assert len(set(img.convert("RGB").getdata())) > 50  # lines, labels: not a blank canvas


def test_single_valued_axes_are_not_plotted_but_said(tmp_path):
    write_markdown(capacity_grid(), tmp_path / "results.md", title="t", command="c")
    assert len(list(tmp_path.glob("*.png"))) == 2
    rows = [teacher(), *seeds("token", "tiny", [10, 11, 12]), *seeds("sentence", "tiny", [9, 10, 11])]
    md = write_markdown(rows, tmp_path / "results.md", title="t", command="c").read_text()
    assert not list(tmp_path.glob("*.png"))  # not drawn, and the earlier run's plots are not left to mislead
    assert "BLEU vs student parameters: not drawn, every student of this grid has the same size." in md
    assert "BLEU vs noise rate: not drawn, every student of this grid has the same noise rate." in md
    assert "no decoding comparison" in md


def test_markdown_refuses_no_rows(tmp_path):
    with pytest.raises(InputError, match="no result rows"):
        write_markdown([], tmp_path / "results.md", title="t", command="c")
    assert not (tmp_path / "results.md").exists()


# --- claims --------------------------------------------------------------------------------------------------


def verdict(rows, key):
    claim = next(c for c in evaluate_claims(aggregate(rows)) if c.key == key)
    return claim.verdict, claim.sentence


def crossover(tok_small, sen_small, tok_large, sen_large):
    return (seeds("token", "tiny", tok_small) + seeds("sentence", "tiny", sen_small)
            + seeds("token", "small", [9, 9, 9]) + seeds("token", "mini", tok_large)
            + seeds("sentence", "mini", sen_large))


def test_claim_a_token_vs_sentence_by_size():
    supported = crossover([5, 6, 7], [7, 8.2, 9], [12, 13, 14], [10, 10.9, 12])
    v, sentence = verdict(supported, "a")
    assert v is Verdict.SUPPORTED
    assert "-2.07 ± " in sentence and "at the smallest student (tiny, 1.00M" in sentence  # 6 - 8.07
    assert verdict(crossover([8, 9, 10], [5, 6.1, 7], [12, 13, 14], [10, 10.9, 12]), "a")[0] is Verdict.CONTRADICTED
    assert verdict(crossover([5, 9, 7], [7, 6, 9], [12, 13, 14], [10, 10.9, 12]), "a")[0] is Verdict.INCONCLUSIVE
    assert verdict(seeds("token", "tiny", [1, 2]) + seeds("sentence", "tiny", [1, 2]), "a")[0] is Verdict.NOT_MEASURED


def robustness(token_noisy, sentence_noisy):
    return (seeds("token", "tiny", [10, 10.5, 11]) + seeds("token", "tiny", token_noisy, noise=("swap", 0.3))
            + seeds("token", "tiny", [9, 9, 9], noise=("swap", 0.1))  # not the highest rate: not compared
            + seeds("sentence", "tiny", [9, 9.5, 10]) + seeds("sentence", "tiny", sentence_noisy, noise=("swap", 0.3)))


def test_claim_b_noise_robustness():
    v, sentence = verdict(robustness([5, 5.3, 6], [8, 8.4, 9]), "b")
    assert v is Verdict.SUPPORTED
    assert "swap 0 → 0.3" in sentence and "token drops +5.07" in sentence and "sentence +1.03" in sentence
    assert verdict(robustness([9, 9.6, 10], [5, 5.3, 6]), "b")[0] is Verdict.CONTRADICTED
    assert verdict(robustness([5, 8, 10], [6, 9.8, 8]), "b")[0] is Verdict.INCONCLUSIVE
    assert verdict(seeds("token", "tiny", [1, 2]), "b")[0] is Verdict.NOT_MEASURED


def decodings(beam, greedy, forcing):
    return (seeds("sentence", "tiny", beam) + seeds("sentence", "tiny", greedy, decoding="greedy")
            + seeds("sentence", "tiny", forcing, decoding="teacher_forcing"))


def test_claim_c_beam_data_for_sentence_level():
    v, sentence = verdict(decodings([10, 11, 12], [8, 8.6, 9.5], [6, 7.1, 8]), "c")
    assert v is Verdict.SUPPORTED and "beam − greedy +2.30" in sentence and "beam − teacher_forcing +3.97" in sentence
    assert verdict(decodings([10, 11, 12], [12, 13.2, 14], [6, 7.1, 8]), "c")[0] is Verdict.CONTRADICTED
    assert verdict(decodings([10, 11, 12], [9, 12, 11.5], [6, 7.1, 8]), "c")[0] is Verdict.INCONCLUSIVE
    assert verdict(seeds("sentence", "tiny", [1, 2]), "c")[0] is Verdict.NOT_MEASURED


def test_claim_d_where_capacity_stops_paying():
    rows = seeds("token", "tiny", [5, 5.5, 6]) + seeds("token", "small", [10, 10.4, 11]) + seeds(
        "token", "mini", [10, 11.2, 10.4])
    v, sentence = verdict(rows, "d")
    assert v is Verdict.SUPPORTED and "stops paying at small → mini" in sentence
    assert "tiny → small +4.97" in sentence
    losing = seeds("token", "tiny", [10, 10.5, 11]) + seeds("token", "small", [5, 5.4, 6])
    assert verdict(losing, "d")[0] is Verdict.CONTRADICTED
    within = seeds("token", "tiny", [5, 5.5, 6]) + seeds("token", "small", [5, 6.4, 4.9])
    assert verdict(within, "d")[0] is Verdict.INCONCLUSIVE
    assert verdict(seeds("token", "tiny", [1, 2]), "d")[0] is Verdict.NOT_MEASURED


def test_claim_e_headline_picks_the_smallest_qualifying_student():
    # 95 % of 20 = 19. mini (4M) is best, small (2M) and tiny (1M, the pick) qualify; sentence tiny does not.
    rows = [teacher(), *seeds("token", "mini", [19.9, 20, 20.1]), *seeds("token", "small", [19.5, 19.6, 19.7]),
            *seeds("nll", "tiny", [19.3, 19.4, 19.5]), *seeds("sentence", "tiny", [18, 18.1, 18.2])]
    v, sentence = verdict(rows, "e")
    assert v is Verdict.SUPPORTED
    assert sentence.startswith("the smallest student keeping ≥ 95 % is nll tiny (clean, references data)")
    assert "97.0 % of the teacher's 20.00" in sentence and "12.5 % of the teacher's 8.00M" in sentence
    assert "8.00× its sentences/s" in sentence  # 8e7 / 1e6 = 80 vs 10
    wide = [teacher(), *seeds("nll", "tiny", [18.2, 19.4, 20.6])]  # mean 19.4 ≥ 19, CI reaches below
    assert verdict(wide, "e")[0] is Verdict.INCONCLUSIVE
    big = [teacher(), *seeds("token", "mini", [19.5, 19.6, 19.7])]  # qualifies with half the teacher's size
    assert verdict(big, "e")[0] is Verdict.CONTRADICTED
    v, sentence = verdict([teacher(), *seeds("token", "mini", [10, 11, 12])], "e")
    assert v is Verdict.CONTRADICTED and sentence.startswith("none reaches 95 %") and "55.0 % of the" in sentence
    assert verdict(seeds("token", "tiny", [1, 2]), "e")[0] is Verdict.NOT_MEASURED
    # no share of a teacher scoring 0 or of unknown size (a toy teacher; a BYO one without model_info.json)
    v, sentence = verdict([teacher(bleu=0.0), *seeds("token", "mini", [0.0, 0.0])], "e")
    assert v is Verdict.NOT_MEASURED and "BLEU above 0" in sentence
    unknown = teacher().model_copy(update={"parameters": 0})
    v, sentence = verdict([unknown, *seeds("token", "mini", [10, 11, 12])], "e")
    assert v is Verdict.NOT_MEASURED and "unknown: set teacher_parameters" in sentence


# --- docs/RESULTS.md ------------------------------------------------------------------------------------------


def test_results_doc_assembles_grids_and_keeps_readings(tmp_path):
    for grid in ("capacity", "decoding"):
        write_csv(capacity_grid(grid) if grid == "capacity" else [teacher(grid)] + [
            r.model_copy(update={"grid": grid}) for r in decodings([10, 11, 12], [8, 8.6, 9.5], [6, 7.1, 8])],
            tmp_path / grid / "results.csv")
    out = tmp_path / "docs" / "RESULTS.md"
    command = "distillery experiment report experiments/capacity experiments/decoding"
    write_results_doc([tmp_path / "capacity", tmp_path / "decoding"], out, command=command)
    doc = out.read_text()
    assert doc.splitlines()[0].startswith(f"Regenerate this file with `{command}`")
    assert "## Grid `capacity`" in doc and "## Grid `decoding`" in doc
    assert (tmp_path / "docs" / "results" / "capacity-bleu-vs-parameters.png").stat().st_size > 20_000
    assert "![BLEU vs student parameters](results/capacity-bleu-vs-parameters.png)" in doc
    claims_part = doc[doc.index("## The research's claims"):]
    assert claims_part.count("**Reading:** …") == len(TITLES)  # one per claim, a–h
    assert "- **decoding** — supported: sentence-level, tiny, clean: beam − greedy +2.30" in claims_part
    # A human writes a reading; regenerating keeps it.
    out.write_text(doc.replace("**Reading:** … _(placeholder", "**Reading:** beam wins here. _(was placeholder", 1))
    write_results_doc([tmp_path / "capacity", tmp_path / "decoding"], out, command=command)
    assert "**Reading:** beam wins here." in out.read_text()
    with pytest.raises(InputError, match="also in an earlier directory"):
        write_results_doc([tmp_path / "capacity", tmp_path / "capacity"], tmp_path / "other.md", command=command)
    with pytest.raises(FileNotFoundError):
        write_results_doc([tmp_path / "missing"], tmp_path / "other.md", command=command)
    assert not (tmp_path / "other.md").exists()


def test_claim_f_compares_the_best_learned_gate_with_token_sentence_and_the_best_fixed_mix():
    base = seeds("token", "tiny", [10, 10.5, 11]) + seeds("sentence", "tiny", [9, 9.5, 10])
    fixed = (seeds("hybrid[g=0.25,gate=fixed]", "tiny", [10.5, 11, 11.5])
             + seeds("hybrid[g=0.75,gate=fixed]", "tiny", [9, 9.4, 9.8]))
    learned = (seeds("hybrid[gate=heldout]", "tiny", [12, 12.6, 13.1])
               + seeds("hybrid[gate=uncertainty]", "tiny", [8, 8.5, 9]))
    v, sentence = verdict(base + fixed + learned, "f")
    assert v is Verdict.SUPPORTED
    assert "best learned gate hybrid[gate=heldout]" in sentence and "best fixed hybrid[g=0.25,gate=fixed]" in sentence
    assert "hybrid[gate=uncertainty] 8.50" in sentence  # every gate is named, not only the winner
    losing = base + fixed + seeds("hybrid[gate=heldout]", "tiny", [9, 9.5, 10])  # below the best fixed g
    assert verdict(losing, "f")[0] is Verdict.CONTRADICTED
    assert verdict(base + learned, "f")[0] is Verdict.NOT_MEASURED  # no fixed-g baseline to beat


def online_rows(okd_bleu, okd_minutes, policy_bleu, policy_minutes) -> list[ResultRow]:
    return [student(method, "tiny", seed, bleu, decoding="teacher_forcing", train_minutes=minutes)
            for method, bleus, minutes_ in (("okd", okd_bleu, okd_minutes), ("on_policy", policy_bleu, policy_minutes))
            for seed, bleu, minutes in zip((1, 2, 3), bleus, minutes_, strict=True)]


def test_claim_g_okd_against_on_policy_in_quality_and_time():
    token = seeds("token", "tiny", [8, 8.2, 8.1], train_minutes=20.0)
    faster = online_rows([10, 10.4, 9.9], [60, 62, 61], [10.2, 10.1, 10.0], [90, 95, 92])
    v, sentence = verdict(faster + token, "g")
    assert v is Verdict.SUPPORTED  # the BLEU difference is within its CI, the time difference counts
    assert "okd − on_policy +0.00" in sentence and "1.51× okd's time" in sentence and "token 8.10" in sentence
    assert verdict(online_rows([10, 10.4, 9.9], [100, 101, 102], [10.2, 10.1, 10.0], [90, 95, 92]),
                   "g")[0] is Verdict.CONTRADICTED  # slower
    assert verdict(online_rows([8, 8.1, 8.2], [60, 62, 61], [10, 10.1, 10.2], [90, 95, 92]),
                   "g")[0] is Verdict.CONTRADICTED  # worse
    assert verdict(online_rows([10, 10.4, 9.9], [90, 96, 91], [10.2, 10.1, 10.0], [90, 95, 92]),
                   "g")[0] is Verdict.INCONCLUSIVE  # as slow
    assert verdict(token, "g")[0] is Verdict.NOT_MEASURED


def sized(method, label, parameters, values) -> list[ResultRow]:
    return [r.model_copy(update={"size": label, "parameters": parameters}) for r in seeds(method, "tiny", values)]


def test_claim_h_gated_student_against_the_fixed_one_of_its_pruned_size():
    gated = sized("token", "d128-e3-d3-f512-gates", 1_950_000, [12, 12.5, 13])
    half = sized("token", "d128-e3-d3-f256", 2_000_000, [10, 10.5, 11])
    full = seeds("token", "mini", [14, 14.5, 15])
    v, sentence = verdict(gated + half + full, "h")
    assert v is Verdict.SUPPORTED and "fixed d128-e3-d3-f256 (2.00M" in sentence  # the nearest size, not mini
    assert verdict(sized("token", "d128-e3-d3-f512-gates", 1_950_000, [9, 9.5, 10]) + half + full,
                   "h")[0] is Verdict.CONTRADICTED
    v, sentence = verdict(gated + full, "h")  # mini is twice its size: not a like-for-like comparison
    assert v is Verdict.NOT_MEASURED and "no fixed student within 10%" in sentence


def gate_marker(units, method, seed, gates, **extra):
    trajectory = [{"step": 200 * (i + 1), "valid_loss": 5.0, "gate": g, **extra} for i, g in enumerate(gates)]
    coords = {"kind": "student", "method": method, "size": "tiny", "seed": seed, "noise_kind": "none",
              "noise_rate": 0.0, "decoding": "beam"}
    units.mkdir(parents=True, exist_ok=True)
    (units / f"student-{method}-{seed}.json").write_text(json.dumps({"trajectory": trajectory, "coords": coords}))


def test_trajectories_show_each_gate_at_each_validation_and_how_it_moved(tmp_path):
    from distillery.experiment.trajectories import read_trajectories, trajectory_tables

    units = tmp_path / "units"
    gate_marker(units, "hybrid", 1, [0.52, 0.55, 0.61, 0.63])  # the drift the scalar gate is known for
    gate_marker(units, "hybrid[gate=heldout]", 1, [0.5, 0.46, 0.49, 0.49])
    gate_marker(units, "hybrid[g=0.5,gate=fixed]", 1, [0.5, 0.5, 0.5, 0.5])
    (units / "student-token-1.json").write_text(json.dumps({"trajectory": [{"step": 200}], "coords": {}}))
    (units / "eval-x.json").write_text("{}")
    (block,) = trajectory_tables(read_trajectories(units))
    rows = tables(block)[0]
    assert [r["method"] for r in rows] == ["hybrid", "hybrid[g=0.5,gate=fixed]", "hybrid[gate=heldout]"]
    assert rows[0]["step 200"] == "0.520" and rows[0]["step 800"] == "0.630"
    assert [r["movement"] for r in rows] == ["rose at every validation", "constant", "moved both ways"]
    assert trajectory_tables([]) == []


def test_results_doc_has_the_trajectories_of_its_grids(tmp_path):
    write_csv([r.model_copy(update={"grid": "gates"}) for r in [teacher(), *seeds("hybrid", "tiny", [5, 6, 7])]],
              tmp_path / "gates" / "results.csv")
    gate_marker(tmp_path / "gates" / "units", "hybrid", 1, [0.5, 0.6], ffn_open=0.9, teacher_valid_loss=2.9)
    out = write_results_doc([tmp_path / "gates"], tmp_path / "RESULTS.md", command="c")
    doc = out.read_text()
    assert "### Trajectories" in doc and "Token weight g of the hybrid gate" in doc
    assert "Kept fraction of FFN channels" in doc and "| hybrid | tiny | 1 | 0.900 | 0.900 | constant |" in doc
    assert "The OKD teacher's NLL on the valid references" in doc and "| 2.900 | 2.900 | constant |" in doc


def test_a_learned_width_student_is_its_own_line_in_the_plots():
    from distillery.experiment.plots import _series
    from distillery.experiment.stats import aggregate

    rows = [*seeds("token", "small", [8, 9, 10]), *seeds("token", "mini", [9, 10, 11])]
    gated = [r.model_copy(update={"size": "small-gates", "parameters": 1_990_000, "unit": r.unit + "-g"})
             for r in seeds("token", "small", [9, 10, 11])]
    lines = _series(aggregate(rows + gated), ("decoding", "noise_label"))
    assert {label: [a.size for a in line] for label, line in lines.items()} == {
        "token": ["small", "mini"], "token · learned FFN width": ["small-gates"]}
