"""Paired bootstrap: hand-checkable cases and invariances."""

from __future__ import annotations

import numpy as np
import pytest

from coreselect.errors import CoreselectError
from coreselect.eval.bootstrap import detectable_difference, paired_bootstrap


def test_constant_difference_has_a_degenerate_interval() -> None:
    r = paired_bootstrap([3.0, 5.0, 7.0], [2.0, 4.0, 6.0], iters=200)
    assert r["diff"] == r["lo"] == r["hi"] == pytest.approx(1.0)
    assert (r["p_le0"], r["p_ge0"]) == (0.0, 1.0) and r["n"] == 3
    assert r["se"] == 0.0 and detectable_difference(r["se"]) == 0.0


def test_two_items_resample_means_are_the_three_possible_values() -> None:
    # differences (1, 0): a resample of 2 items has mean 0 (p=1/4), 0.5 (1/2) or 1 (1/4)
    r = paired_bootstrap([1.0, 0.0], [0.0, 0.0], iters=20000, seed=1)
    assert r["diff"] == 0.5
    assert r["p_le0"] == pytest.approx(0.25, abs=0.02)
    assert (r["lo"], r["hi"]) == (0.0, 1.0)
    # variance of that three-point law: 0.25 * 0.25 + 0.25 * 0.25 = 0.125
    assert r["se"] == pytest.approx(0.125**0.5, abs=0.005)


def test_detectable_difference_by_hand() -> None:
    """(z_0.975 + z_0.8) se = (1.95996 + 0.84162) se; other levels and powers likewise."""
    assert detectable_difference(1.0) == pytest.approx(2.801585, abs=1e-6)
    assert detectable_difference(0.01) == pytest.approx(0.02801585, abs=1e-8)
    assert detectable_difference(2.0, level=0.90, power=0.5) == pytest.approx(2 * 1.644854, abs=1e-6)


def test_pairing_removes_item_variance() -> None:
    rng = np.random.default_rng(0)
    item = rng.normal(0, 5, 400)  # large between-item spread shared by both systems
    a, b = item + 0.1, item.copy()
    r = paired_bootstrap(a, b, iters=500)
    assert r["diff"] == pytest.approx(0.1) and r["hi"] - r["lo"] < 1e-9


def test_antisymmetric_and_seeded() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random(50), rng.random(50)
    ab, ba = paired_bootstrap(a, b, seed=7, iters=1000), paired_bootstrap(b, a, seed=7, iters=1000)
    assert ab["diff"] == pytest.approx(-ba["diff"])
    assert ab["lo"] == pytest.approx(-ba["hi"]) and ab["p_le0"] == pytest.approx(ba["p_ge0"])
    assert paired_bootstrap(a, b, seed=7, iters=1000) == ab


def test_bad_input() -> None:
    with pytest.raises(CoreselectError, match="equally long"):
        paired_bootstrap([1.0], [1.0, 2.0])
    with pytest.raises(CoreselectError, match="non-empty"):
        paired_bootstrap([], [])


def test_one_seed_rows_are_the_item_bootstrap() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.random(40), rng.random(40)
    assert paired_bootstrap(a[None], b[None], iters=500, seed=2) == paired_bootstrap(a, b, iters=500, seed=2)


def test_seed_spread_widens_the_interval_by_hand() -> None:
    # a's two seeds differ by 2 on every item, b has one seed at 0: the item draw changes
    # nothing, the seed draw gives {s0, s0} -> 1, {s0, s1} -> 2, {s1, s1} -> 3 (p 1/4, 1/2, 1/4)
    a = [[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]]
    b = [[0.0, 0.0, 0.0]]
    r = paired_bootstrap(a, b, iters=20000, seed=0)
    assert r["diff"] == pytest.approx(2.0) and (r["lo"], r["hi"]) == (1.0, 3.0)
    means_at_1 = paired_bootstrap(a, b, iters=20000, seed=0, level=0.0)  # level 0: lo = hi = the median
    assert means_at_1["lo"] == means_at_1["hi"] == 2.0
    # averaging the seeds first (the item bootstrap) hides that spread: a degenerate interval
    flat = paired_bootstrap(np.mean(a, axis=0), b[0], iters=2000)
    assert flat["lo"] == flat["hi"] == 2.0


def test_seeded_rows_antisymmetric_with_unequal_seed_counts() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.random((3, 60)), rng.random((2, 60))
    ab, ba = paired_bootstrap(a, b, seed=4, iters=2000), paired_bootstrap(b, a, seed=4, iters=2000)
    assert ab["diff"] == pytest.approx(a.mean() - b.mean()) == pytest.approx(-ba["diff"])
    assert ab["lo"] < ab["diff"] < ab["hi"] and ab["n"] == 60
    with pytest.raises(CoreselectError, match="equally long"):
        paired_bootstrap(a, b[:, :59])
