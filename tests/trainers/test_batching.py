"""The batch plans: token-budget batches, and the windowed plan that a streaming reader follows."""

import numpy as np

from trainers.batching import token_batches, windowed_token_batches


def test_a_corpus_within_one_window_gets_the_global_plan():
    lengths = np.random.default_rng(0).integers(3, 60, 900)
    groups = np.array([400, 0, 300, 200])
    plan = windowed_token_batches(lengths, groups, window=900, max_tokens=500, seed=4, epoch=2)
    assert [b.tolist() for b in plan] == [b.tolist() for b in token_batches(lengths, max_tokens=500, seed=4, epoch=2)]


def test_windows_cover_every_row_once_within_budget_and_one_window_at_a_time():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 300, 40)
    lengths = rng.integers(3, 60, groups.sum())
    window = 700
    plan = windowed_token_batches(lengths, groups, window=window, max_tokens=600, seed=0, epoch=0)
    assert sorted(np.concatenate(plan).tolist()) == list(range(groups.sum()))
    assert all(len(b) * lengths[b].max() <= 600 or len(b) == 1 for b in plan)
    assert plan[0].tolist() != windowed_token_batches(lengths, groups, window=window, max_tokens=600, seed=0,
                                                      epoch=1)[0].tolist()
    # The rows a reader must hold at step t: every group used both at or before t and at or after t.
    starts = np.concatenate([[0], np.cumsum(groups)])
    touched = [set((np.searchsorted(starts, b, side="right") - 1).tolist()) for b in plan]
    first = {g: min(t for t, s in enumerate(touched) if g in s) for g in set().union(*touched)}
    last = {g: max(t for t, s in enumerate(touched) if g in s) for g in first}
    live = [sum(groups[g] for g in first if first[g] <= t <= last[g]) for t in range(len(plan))]
    assert max(live) <= window < groups.sum() / 4
