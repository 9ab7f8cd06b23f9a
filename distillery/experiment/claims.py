"""The research's claims (../shared/research.md) read off one grid's aggregated results, with a verdict each.

Every comparison is a contrast of group means with its 95 % CI (``stats.contrast``: paired over seeds when the
groups share them, Welch otherwise). One rule decides: a difference *counts* when its CI excludes 0; a claim is

- **supported** when every difference it needs counts in the claimed direction,
- **contradicted** when one counts in the opposite direction,
- **inconclusive (CIs overlap)** otherwise (a CI that includes 0, or one seed and so no CI),
- **not measured by this grid** when the grid lacks the groups to compare.

Comparisons hold everything else fixed: students on clean data (noise rate 0) unless noise is the point, the
same size, and for each method one decoding of its data: one both methods share if there is one, else the
method's usual one (teacher forcing for token-level losses, beam for sequence-level ones).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .stats import Aggregate, Stat, contrast
from .tables import fmt_params, teacher_of

HEADLINE_SHARE = 0.95  # "keeps the teacher": mean BLEU ≥ 95 % of the teacher's
PARAMETER_GOAL = 0.25  # the goal for that student: at most ¼ of the teacher's parameters
# Preferred decoding of a method's data when it has several, first match wins.
USUAL = {"token": "teacher_forcing", "sentence": "beam", "hybrid": "beam", "nll": "references"}
PREFERENCE = ("beam", "teacher_forcing", "greedy", "sample", "references")


class Verdict(StrEnum):
    SUPPORTED = "supported"
    CONTRADICTED = "contradicted"
    INCONCLUSIVE = "inconclusive (CIs overlap)"
    NOT_MEASURED = "not measured by this grid"


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    verdict: Verdict
    sentence: str  # the measured comparison, numbers included


TITLES = {
    "a": "Token-level KD wins for larger students, sentence-level KD for smaller ones",
    "b": "Sentence-level KD is more robust than token-level KD as noise grows",
    "c": "For sentence-level KD, beam data beats greedy and teacher-forcing data",
    "d": "Student capacity pays, with diminishing returns: where it stops paying",
    "e": "Headline: the smallest student keeping ≥ 95 % of the teacher's BLEU (goal: ≤ ¼ of its parameters)",
    "f": "A learned hybrid gate beats token-level KD, sentence-level KD and the best fixed mix",
    "g": "Online KD matches or beats on-policy distillation in less training time",
    "h": "A student that learns its FFN width beats a fixed one of the same final parameter count",
}
SAME_SIZE = 0.10  # (h): a fixed student within 10 % of the gated one's pruned parameter count is "the same size"


def evaluate_claims(aggs: Sequence[Aggregate]) -> list[Claim]:
    """The verdict on each claim (a–h) from the aggregated rows of one grid.

    Raises:
        ValueError: rows of several grids (each grid is its own experiment).
    """
    grids = {a.grid for a in aggs}
    if len(grids) > 1:
        raise ValueError(f"claims are read per grid, got rows of {sorted(grids)}")
    students = [a for a in aggs if a.kind == "student"]
    teacher = teacher_of(aggs, next(iter(grids))) if grids else None
    checks: dict[str, Callable[[], tuple[Verdict, str]]] = {
        "a": lambda: _capacity_crossover(students), "b": lambda: _noise_robustness(students),
        "c": lambda: _decoding(students), "d": lambda: _capacity(students), "e": lambda: _headline(students, teacher),
        "f": lambda: _hybrid_gates(students), "g": lambda: _online(students), "h": lambda: _adaptive(students),
    }
    return [Claim(key, TITLES[key], *check()) for key, check in checks.items()]


# --- helpers -----------------------------------------------------------------------------------------------


def _diff(stat: Stat) -> str:
    if stat.half is None:
        return f"{stat.mean:+.2f} BLEU (one seed: no CI)"
    return f"{stat.mean:+.2f} ± {stat.half:.2f} BLEU"


def _diff_minutes(stat: Stat) -> str:
    return f"{stat.mean:+.1f}" + (" min (one seed: no CI)" if stat.half is None else f" ± {stat.half:.1f} min")


def _bleu(agg: Aggregate) -> str:
    stat = agg.stat("bleu")
    return f"{stat.mean:.2f}" + ("" if stat.half is None else f" ± {stat.half:.2f}")


def _direction(signs: Sequence[int]) -> Verdict:
    """+1 each where the claim needs it: all +1 supports, any -1 contradicts."""
    if any(s < 0 for s in signs):
        return Verdict.CONTRADICTED
    return Verdict.SUPPORTED if signs and all(s > 0 for s in signs) else Verdict.INCONCLUSIVE


def _combine(verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict from several sub-results (noise kinds, methods): unanimous, else inconclusive."""
    measured = {v for v in verdicts if v is not Verdict.NOT_MEASURED}
    if not measured:
        return Verdict.NOT_MEASURED
    return measured.pop() if len(measured) == 1 else Verdict.INCONCLUSIVE


def _choose(group: Sequence[Aggregate], method: str, decodings: set[str] | None = None) -> Aggregate:
    """One group of ``group`` (all one method): its usual decoding, else by PREFERENCE."""
    options = [a for a in group if decodings is None or a.decoding in decodings]
    order = (USUAL.get(method), *PREFERENCE)
    return min(options, key=lambda a: order.index(a.decoding) if a.decoding in order else len(order))


def _matched(first: Sequence[Aggregate], second: Sequence[Aggregate], m1: str, m2: str):
    """One group of each method, on a decoding they share if any, else each on its usual one."""
    shared = {a.decoding for a in first} & {a.decoding for a in second}
    if shared:
        pick = min(shared, key=PREFERENCE.index)
        return _choose(first, m1, {pick}), _choose(second, m2, {pick})
    return _choose(first, m1), _choose(second, m2)


def _where(aggs: Sequence[Aggregate], **coords) -> list[Aggregate]:
    return [a for a in aggs if all(getattr(a, k) == v for k, v in coords.items())]


def _clean(students: Sequence[Aggregate]) -> list[Aggregate]:
    return [a for a in students if a.clean]


# --- the claims --------------------------------------------------------------------------------------------


def _capacity_crossover(students: Sequence[Aggregate]) -> tuple[Verdict, str]:
    """(a) token − sentence at the smallest and at the largest size both methods were trained at (clean data)."""
    clean = _clean(students)
    sizes = sorted({a.parameters for a in _where(clean, method="token")}
                   & {a.parameters for a in _where(clean, method="sentence")})
    if len(sizes) < 2:
        return Verdict.NOT_MEASURED, "needs token- and sentence-level students of two or more sizes on clean data."
    parts, signs = [], []
    for where, params, want in (("smallest", sizes[0], -1), ("largest", sizes[-1], 1)):
        tok, sen = _matched(_where(clean, method="token", parameters=params),
                            _where(clean, method="sentence", parameters=params), "token", "sentence")
        diff = contrast([(1, tok), (-1, sen)])
        signs.append(want * diff.sign())
        parts.append(f"{_diff(diff)} at the {where} student ({tok.size}, {fmt_params(params)}; token {_bleu(tok)} "
                     f"on {tok.decoding} data, sentence {_bleu(sen)} on {sen.decoding})")
    return _direction(signs), "token − sentence: " + "; ".join(parts) + "."


def _noise_robustness(students: Sequence[Aggregate]) -> tuple[Verdict, str]:
    """(b) per noise kind: BLEU drop from clean to the highest rate, token's drop − sentence's (> 0 supports)."""
    kinds = sorted({a.noise_kind for a in students if not a.clean})
    verdicts, parts = [], []
    for kind in kinds:
        noisy = [a for a in students if a.noise_kind == kind]
        top = max(a.noise_rate for a in noisy)
        found = None
        # The largest size at which both methods have clean and top-rate students on one decoding each.
        for params in sorted({a.parameters for a in students}, reverse=True):
            drops = []
            for method in ("token", "sentence"):
                clean = _where(_clean(students), method=method, parameters=params)
                high = _where(noisy, method=method, parameters=params, noise_rate=top)
                shared = {a.decoding for a in clean} & {a.decoding for a in high}
                if not shared:
                    break
                pick = _choose(clean, method, shared).decoding
                drops.append((_where(clean, decoding=pick)[0], _where(high, decoding=pick)[0]))
            if len(drops) == 2:
                found = drops
                break
        if found is None:
            continue
        (t0, th), (s0, sh) = found
        gap = contrast([(1, t0), (-1, th), (-1, s0), (1, sh)])
        verdicts.append(_direction([gap.sign()]))
        parts.append(f"{kind} 0 → {top:g} ({t0.size}): token drops {_diff(contrast([(1, t0), (-1, th)]))}, "
                     f"sentence {_diff(contrast([(1, s0), (-1, sh)]))}; token's drop − sentence's {_diff(gap)}")
    if not parts:
        return Verdict.NOT_MEASURED, "needs token- and sentence-level students on clean and noisy data."
    return _combine(verdicts), "; ".join(parts) + "."


def _decoding(students: Sequence[Aggregate]) -> tuple[Verdict, str]:
    """(c) sentence-level students: beam − greedy and beam − teacher forcing, in one (size, noise) cell."""
    sentence = _where(students, method="sentence")
    cells: dict[tuple, dict[str, Aggregate]] = {}
    for a in sentence:
        cells.setdefault((a.parameters, a.noise_kind, a.noise_rate), {})[a.decoding] = a
    usable = {k: v for k, v in cells.items() if "beam" in v and {"greedy", "teacher_forcing"} & set(v)}
    if not usable:
        return Verdict.NOT_MEASURED, "needs sentence-level students on beam data and on greedy or teacher-forcing data."
    # Clean data first, then the cell with most decodings, then the largest student.
    key = max(usable, key=lambda k: (k[2] == 0, len(usable[k]), k[0]))
    cell = usable[key]
    beam = cell["beam"]
    signs, parts = [], []
    for other in ("greedy", "teacher_forcing"):
        if other in cell:
            diff = contrast([(1, beam), (-1, cell[other])])
            signs.append(diff.sign())
            parts.append(f"beam − {other} {_diff(diff)} ({_bleu(beam)} vs {_bleu(cell[other])})")
        else:
            parts.append(f"{other} not measured")
    return _direction(signs), f"sentence-level, {beam.size}, {beam.noise_label}: " + "; ".join(parts) + "."


def _capacity(students: Sequence[Aggregate]) -> tuple[Verdict, str]:
    """(d) per method on clean data: BLEU gain of each size step; the first gain whose CI includes 0 is where
    capacity stops paying. Supported: the first step pays and a later one stops; contradicted: the first step
    loses; inconclusive: the first step's CI includes 0, or capacity still pays at the largest step."""
    clean = _clean(students)
    verdicts, parts = [], []
    for method in sorted({a.method for a in clean}):
        groups = _where(clean, method=method)
        # The decoding with the most sizes (the usual one on a tie).
        decodings = sorted({a.decoding for a in groups},
                           key=lambda d: (-len({a.parameters for a in groups if a.decoding == d}),
                                          _choose(groups, method).decoding != d, d))
        line = _where(groups, decoding=decodings[0])
        by_size = {a.parameters: a for a in line}
        if len(by_size) < 2:
            continue
        steps = sorted(by_size)
        gains = [(by_size[p], by_size[q], contrast([(1, by_size[q]), (-1, by_size[p])]))
                 for p, q in zip(steps, steps[1:], strict=False)]
        stop = next((i for i, (_, _, g) in enumerate(gains) if g.sign() <= 0), None)
        text = ", ".join(f"{a.size} → {b.size} {_diff(g)}" for a, b, g in gains)
        if gains[0][2].sign() < 0:
            verdict, where = Verdict.CONTRADICTED, "the first step loses"
        elif stop == 0:
            verdict = Verdict.INCONCLUSIVE
            where = "one seed: no CI" if gains[0][2].half is None else "the first step's gain is within its CI"
        elif stop is None:
            verdict, where = Verdict.INCONCLUSIVE, "capacity still pays at the largest step measured"
        else:
            verdict, where = Verdict.SUPPORTED, f"stops paying at {gains[stop][0].size} → {gains[stop][1].size}"
        verdicts.append(verdict)
        parts.append(f"{method} ({line[0].decoding}): {text}; {where}")
    if not parts:
        return Verdict.NOT_MEASURED, "needs students of two or more sizes of one method on clean data."
    return _combine(verdicts), "; ".join(parts) + "."


def _headline(students: Sequence[Aggregate], teacher: Aggregate | None) -> tuple[Verdict, str]:
    """(e) the smallest student whose mean BLEU ≥ 95 % of the teacher's (the higher BLEU on a tie of size).
    Contradicted when none qualifies or it has more than ¼ of the teacher's parameters; otherwise supported when
    its BLEU's CI lies wholly above 95 % of the teacher's, inconclusive when the CI reaches below (or one seed)."""
    if teacher is None or not students:
        return Verdict.NOT_MEASURED, "needs the grid's teacher row and students."
    t_bleu = teacher.stat("bleu").mean
    t_speed = teacher.stat("sentences_per_s").mean
    if not t_bleu > 0 or teacher.parameters <= 0:  # nothing to take a share of
        count = fmt_params(teacher.parameters) if teacher.parameters > 0 else "unknown: set teacher_parameters"
        return Verdict.NOT_MEASURED, (f"needs the teacher's BLEU above 0 (it is {t_bleu:.2f}) and its parameter "
                                      f"count ({count}).")

    def describe(a: Aggregate) -> str:
        return (f"{a.method} {a.size} ({a.noise_label}, {a.decoding} data): BLEU {_bleu(a)} "
                f"({a.n} seed{'s' if a.n > 1 else ''}), {100 * a.stat('bleu').mean / t_bleu:.1f} % of the "
                f"teacher's {t_bleu:.2f}, {fmt_params(a.parameters)} parameters = "
                f"{100 * a.parameters / teacher.parameters:.1f} % of the teacher's {fmt_params(teacher.parameters)}, "
                f"{a.stat('sentences_per_s').mean / t_speed:.2f}× its sentences/s")

    keeping = [a for a in students if a.stat("bleu").mean >= HEADLINE_SHARE * t_bleu]
    if not keeping:
        best = max(students, key=lambda a: (a.stat("bleu").mean, -a.parameters))
        return Verdict.CONTRADICTED, f"none reaches 95 % of the teacher's BLEU; the best is {describe(best)}."
    pick = min(keeping, key=lambda a: (a.parameters, -a.stat("bleu").mean))
    if pick.parameters > PARAMETER_GOAL * teacher.parameters:
        return Verdict.CONTRADICTED, f"the smallest student keeping ≥ 95 % is {describe(pick)}."
    low = pick.stat("bleu").low
    if low is None or low < HEADLINE_SHARE * t_bleu:
        return Verdict.INCONCLUSIVE, (f"the smallest student keeping ≥ 95 % on average is {describe(pick)}; its "
                                      f"CI reaches below 95 % ({HEADLINE_SHARE * t_bleu:.2f}).")
    return Verdict.SUPPORTED, f"the smallest student keeping ≥ 95 % is {describe(pick)}."


def _is_fixed_gate(method: str) -> bool:
    return method.startswith("hybrid[") and "gate=fixed" in method


def _hybrid_gates(students: Sequence[Aggregate]) -> tuple[Verdict, str]:
    """(f) per size on clean data: the best learned gate (highest mean BLEU among the hybrids that are not
    ``gate=fixed``) − token, − sentence and − the best fixed g. Picking the best of several gates favours them;
    the sentence names every gate so a reader can discount it."""
    clean = _clean(students)
    verdicts, parts = [], []
    for params in sorted({a.parameters for a in clean}):
        here = _where(clean, parameters=params)
        learned = [a for a in here if a.method.split("[")[0] == "hybrid" and not _is_fixed_gate(a.method)]
        fixed = [a for a in here if _is_fixed_gate(a.method)]
        tok, sen = _where(here, method="token"), _where(here, method="sentence")
        if not (learned and fixed and tok and sen):
            continue
        best = max(learned, key=lambda a: a.stat("bleu").mean)
        best_fixed = max(fixed, key=lambda a: a.stat("bleu").mean)
        rivals = [("token", _choose(tok, "token")), ("sentence", _choose(sen, "sentence")),
                  (f"best fixed {best_fixed.method}", best_fixed)]
        diffs = [(name, other, contrast([(1, best), (-1, other)])) for name, other in rivals]
        verdicts.append(_direction([d.sign() for _, _, d in diffs]))
        gates = ", ".join(f"{a.method} {_bleu(a)}" for a in sorted(learned + fixed, key=lambda a: a.method))
        parts.append(f"{best.size}: best learned gate {best.method} ({_bleu(best)}) − "
                     + ", − ".join(f"{name} ({_bleu(other)}) {_diff(d)}" for name, other, d in diffs)
                     + f" [every hybrid: {gates}]")
    if not parts:
        return Verdict.NOT_MEASURED, ("needs, at one size on clean data, token- and sentence-level students, a "
                                      "learned hybrid gate and a fixed-g hybrid.")
    return _combine(verdicts), "; ".join(parts) + "."


def _online(students: Sequence[Aggregate]) -> tuple[Verdict, str]:
    """(g) per size on clean data: okd − on_policy BLEU and on_policy − okd training minutes. Supported when OKD
    is faster (the time difference counts) and its BLEU is not lower (that difference does not count negative);
    contradicted when either counts the other way; inconclusive otherwise. Forward and reverse KL from the cached
    top-k are quoted beside them when the grid has them."""
    clean = _clean(students)
    verdicts, parts = [], []
    for params in sorted({a.parameters for a in clean}):
        here = _where(clean, parameters=params)
        okd, policy = _where(here, method="okd"), _where(here, method="on_policy")
        if not (okd and policy):
            continue
        okd, policy = okd[0], policy[0]
        bleu = contrast([(1, okd), (-1, policy)])
        minutes = contrast([(1, policy), (-1, okd)], metric="train_minutes")
        if bleu.sign() < 0 or minutes.sign() < 0:
            verdict = Verdict.CONTRADICTED
        else:
            verdict = Verdict.SUPPORTED if minutes.sign() > 0 else Verdict.INCONCLUSIVE
        verdicts.append(verdict)
        t_okd, t_policy = okd.stat("train_minutes").mean, policy.stat("train_minutes").mean
        ratio = f"{t_policy / t_okd:.2f}×" if t_okd > 0 else "n/a"
        text = (f"{okd.size}: okd {_bleu(okd)} BLEU in {t_okd:.1f} min, on_policy {_bleu(policy)} in {t_policy:.1f} "
                f"min; okd − on_policy {_diff(bleu)}, on_policy − okd {_diff_minutes(minutes)} ({ratio} okd's time)")
        others = [(m, _where(here, method=m)[0]) for m in ("token", "reverse_kl") if _where(here, method=m)]
        if others:
            text += " (" + "; ".join(f"{m} {_bleu(a)} in {a.stat('train_minutes').mean:.1f} min"
                                     for m, a in others) + ")"
        parts.append(text)
    if not parts:
        return Verdict.NOT_MEASURED, "needs okd and on_policy students of one size on clean data."
    return _combine(verdicts), "; ".join(parts) + "."


def _adaptive(students: Sequence[Aggregate]) -> tuple[Verdict, str]:
    """(h) each method's gated students (size label ``…-gates``, placed at their pruned parameter count) − the
    fixed student of that method whose parameter count is nearest, if within ``SAME_SIZE`` of it."""
    clean = _clean(students)
    verdicts, parts = [], []
    for gated in (a for a in clean if "-gates" in a.size):
        fixed = [a for a in _where(clean, method=gated.method, decoding=gated.decoding) if "-gates" not in a.size]
        if not fixed:
            continue
        near = min(fixed, key=lambda a: abs(a.parameters - gated.parameters))
        if abs(near.parameters - gated.parameters) > SAME_SIZE * gated.parameters:
            parts.append(f"{gated.method} {gated.size} ({fmt_params(gated.parameters)} after pruning): no fixed "
                         f"student within {SAME_SIZE:.0%} of its size (nearest {near.size}, "
                         f"{fmt_params(near.parameters)})")
            continue
        diff = contrast([(1, gated), (-1, near)])
        verdicts.append(_direction([diff.sign()]))
        parts.append(f"{gated.method}: gated {gated.size} ({fmt_params(gated.parameters)} after pruning, "
                     f"{_bleu(gated)}) − fixed {near.size} ({fmt_params(near.parameters)}, {_bleu(near)}) "
                     f"{_diff(diff)}")
    if not verdicts:
        return Verdict.NOT_MEASURED, ("needs a student with learned FFN width and a fixed one of the same method "
                                      "within 10 % of its pruned size" + (": " + "; ".join(parts) if parts else "")
                                      + ".")
    return _combine(verdicts), "; ".join(parts) + "."
