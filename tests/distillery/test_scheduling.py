"""The grid runner's start policy (``pick_units``) on constructed queues: what starts, in which order."""

from __future__ import annotations

from distillery.experiment.grid import Unit
from distillery.experiment.runner import pick_units

CPUS = 2


def unit(kind: str, key: str, seed: int, *needs: str) -> Unit:
    return Unit(kind=kind, key=key, fields={}, needs=needs, coords={"seed": seed})


def need(u: Unit) -> int:
    return CPUS if u.kind in ("eval", "distill") else 1


# Two seeds of two students each on one dataset, each student with its (exclusive) evaluation, in the runner's
# order: seeds ascending, inputs first.
DATA = unit("distill", "d", 0)
A, B = unit("student", "a", 1, "d"), unit("student", "b", 1, "d")
EA, EB = unit("eval", "ea", 1, "a"), unit("eval", "eb", 1, "b")
C, D = unit("student", "c", 2, "d"), unit("student", "d2", 2, "d")
EC, ED = unit("eval", "ec", 2, "c"), unit("eval", "ed", 2, "d2")
QUEUE = [DATA, A, B, EA, EB, C, D, EC, ED]


def pick(queue, done, running, free, lost=()):
    return pick_units(queue, done=set(done), lost=set(lost), running=running, free=free, cpus_needed=need,
                      exclusive_eval=True)


def test_a_finished_students_evaluation_runs_before_any_later_student():
    queue = QUEUE[1:]
    start, _ = pick(queue, done={"d"}, running=0, free=CPUS)
    assert start == [A, B]  # one core each
    # A ends first: its evaluation is ready. Nothing may start on the freed core — not C, not D — or the
    # evaluation would wait until the last student (it needs an idle machine) and a grid cut off meanwhile would
    # lose A's model with the session's cache.
    queue = [u for u in queue if u not in (A, B)]
    start, _ = pick(queue, done={"d", "a"}, running=1, free=1)
    assert start == []
    # B ends: the machine is idle; the evaluations run one at a time, first.
    start, _ = pick(queue, done={"d", "a", "b"}, running=0, free=CPUS)
    assert start == [EA]
    queue.remove(EA)
    start, _ = pick(queue, done={"d", "a", "b", "ea"}, running=0, free=CPUS)
    assert start == [EB]
    queue.remove(EB)
    start, _ = pick(queue, done={"d", "a", "b", "ea", "eb"}, running=0, free=CPUS)
    assert start == [C, D]


def test_without_exclusive_evaluations_the_freed_core_is_used_at_once():
    queue = [u for u in QUEUE[1:] if u not in (A, B)]
    start, _ = pick_units(queue, done={"d", "a"}, lost=set(), running=1, free=1, cpus_needed=lambda u: 1,
                          exclusive_eval=False)
    assert start == [EA]


def test_a_unit_waiting_for_cpus_holds_back_later_seeds_but_not_its_own():
    big = unit("student", "big", 1, "d")  # needs both cores
    queue = [big, unit("student", "small", 1, "d"), unit("student", "later", 2, "d")]
    start, _ = pick_units(queue, done={"d"}, lost=set(), running=1, free=1,
                          cpus_needed=lambda u: 2 if u is big else 1, exclusive_eval=True)
    assert [u.key for u in start] == ["small"]


def test_units_downstream_of_a_failed_unit_are_blocked_in_one_pass():
    start, blocked = pick(QUEUE[1:], done=set(), running=0, free=CPUS, lost={"d"})
    assert start == []
    assert blocked == [A, B, EA, EB, C, D, EC, ED]


def test_while_an_evaluation_waits_only_a_unit_that_ends_before_the_running_ones_takes_the_free_core():
    # A ended, B still runs for long: EA waits for B. D is expected to end before B does, C is not.
    queue = [u for u in QUEUE[1:] if u not in (A, B)]
    start, _ = pick_units(queue, done={"d", "a"}, lost=set(), running=1, free=1, cpus_needed=need,
                          exclusive_eval=True, fits_wait=lambda u: u is D)
    assert start == [D]  # a backfill; EA still runs first once nothing else does
    start, _ = pick_units(queue, done={"d", "a"}, lost=set(), running=1, free=1, cpus_needed=need,
                          exclusive_eval=True, fits_wait=lambda u: False)
    assert start == []  # nothing fits: the plain drain
    evals = [unit("eval", "e1", 1, "a"), unit("eval", "e2", 1, "a")]
    start, _ = pick_units(evals, done={"a"}, lost=set(), running=1, free=1, cpus_needed=lambda u: 1,
                          exclusive_eval=True, fits_wait=lambda u: True)
    assert start == []  # an evaluation is never a backfill: it needs the idle machine


def student(key: str, method: str, seed: int) -> Unit:
    return Unit(kind="student", key=key, fields={}, needs=("d",),
                coords={"method": method, "size": "tiny", "seed": seed})


def test_a_backfill_must_be_expected_to_end_within_the_running_units_remaining_time():
    import time

    from distillery.experiment.runner import _fits_wait

    units = {u.key: u for u in [student("p1", "on_policy", 1), student("r1", "reverse_kl", 1),
                                student("o1", "okd", 1), student("p2", "on_policy", 2),
                                student("r2", "reverse_kl", 2), student("o2", "okd", 2),
                                student("x2", "never_seen", 2)]}
    finished = {"p1": {"seconds": 2400.0}, "r1": {"seconds": 700.0}, "o1": {"seconds": 1800.0}}
    running, started = [units["p2"]], {"p2": time.monotonic() - 1000}  # about 1,400 s left
    fits = _fits_wait(running, started, finished, units)
    assert fits(units["r2"])  # 700 s ≤ 1,400 s
    assert not fits(units["o2"])  # 1,800 s > 1,400 s
    assert not fits(units["x2"])  # no estimate: no backfill
    started["p2"] = time.monotonic() - 2000  # 400 s left: the reverse-KL student no longer fits
    assert not _fits_wait(running, started, finished, units)(units["r2"])
    running, started = [units["x2"]], {"x2": time.monotonic()}  # a running unit without an estimate
    assert not _fits_wait(running, started, finished, units)(units["r2"])
