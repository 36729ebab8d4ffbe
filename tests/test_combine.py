"""coreselect.combine: hand-computed cases (ties, overlaps, -inf, uneven quotas)."""

from __future__ import annotations

import numpy as np
import pytest

from coreselect.combine import (
    combine,
    combined_score,
    coverage_report,
    parse_quota,
    quota_counts,
    rank_normalized,
    target_order,
)
from coreselect.errors import ConfigError
from coreselect.selection import rank_order

INF = float("inf")


def test_target_order_ties_by_position_and_minus_inf_last() -> None:
    s = np.array([1.0, -INF, 3.0, 1.0, -INF])
    assert target_order(s).tolist() == [2, 0, 3, 1, 4]
    with pytest.raises(ConfigError):
        target_order(np.array([1.0, float("nan")]))


def test_rank_normalized() -> None:
    # ranks: pos2 -> 0, pos0 -> 1, pos3 -> 2, pos1 -> 3 (n = 4): (4 - r) / 4
    assert rank_normalized(np.array([1.0, -INF, 3.0, 1.0])).tolist() == [0.75, 0.25, 1.0, 0.5]


def test_parse_quota() -> None:
    names = ["a", "b", "c"]
    assert parse_quota(None, names) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert parse_quota("a=50%,b=25%", names) == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})
    assert parse_quota("a=0.2,b=0.2,c=0.4", names) == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5})
    assert parse_quota({"a": "50%"}, names) == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})
    for bad in ("x=10%", "a", "a=lots", "a=150%", "a=80%,b=40%"):
        with pytest.raises(ConfigError):
            parse_quota(bad, names)


def test_quota_counts_uneven() -> None:
    assert quota_counts(5, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 2, "b": 2, "c": 1}
    assert quota_counts(7, {"a": 0.5, "b": 0.25, "c": 0.25}) == {
        "a": 3,
        "b": 2,
        "c": 2,
    }  # 3.5, 1.75, 1.75: largest remainders .75, .75
    assert quota_counts(0, {"a": 0.5, "b": 0.5}) == {"a": 0, "b": 0}
    assert sum(quota_counts(11, {"a": 0.7, "b": 0.2, "c": 0.1}).values()) == 11


def test_quota_overlap_counts_once_and_next_best_fills() -> None:
    a = np.array([5.0, 4.0, 3.0, 0.0, 0.0, 0.0])  # a's order: 0 1 2 3 4 5
    b = np.array([5.0, 0.0, 0.0, 4.0, 3.0, 0.0])  # b's order: 0 3 4 1 2 5
    order = combine({"a": a, "b": b}, 4, "quota")
    # a takes 0, 1; b wants 0 (taken) -> takes 3, 4
    assert order[:4].tolist() == [0, 1, 3, 4]
    assert sorted(order.tolist()) == list(range(6))


def test_quota_uneven_shares_and_minus_inf() -> None:
    a = np.array([-INF, 2.0, 1.0, -INF, 0.5])
    b = np.array([1.0, -INF, -INF, 2.0, 3.0])
    # k = 3, a=2/3 of it -> a: 2, b: 1
    order = combine({"a": a, "b": b}, 3, "quota", parse_quota("a=66.7%", ["a", "b"]))
    assert order[:3].tolist() == [1, 2, 4]
    # budget larger than the finite scores: -inf records fill in last
    order = combine({"a": a, "b": b}, 5, "quota", {"a": 0.8, "b": 0.2})
    assert order[:4].tolist() == [1, 2, 4, 0] and order[4] == 3


def test_max_and_mean_rank_normalized_ties_by_position() -> None:
    a = np.array([3.0, 2.0, 1.0, 0.0])  # norm: 1, .75, .5, .25
    b = np.array([0.0, 1.0, 2.0, 3.0])  # norm: .25, .5, .75, 1
    assert combine({"a": a, "b": b}, 2, "max").tolist() == [0, 3, 1, 2]  # 1,1 tie -> position
    assert combine({"a": a, "b": b}, 2, "mean").tolist() == [0, 1, 2, 3]  # all .625: positions
    # -inf and huge raw scales don't matter, only ranks
    c = np.array([1e9, -INF, -INF, 0.0])  # norm: 1, .5, .25, .75
    assert combine({"a": a, "c": c}, 2, "mean").tolist() == [0, 1, 3, 2]  # 1, .625, .375, .5


def test_round_robin() -> None:
    a = np.array([5.0, 4.0, 3.0, 2.0, 1.0])  # 0 1 2 3 4
    b = np.array([5.0, 1.0, 2.0, 3.0, 4.0])  # 0 4 3 2 1
    assert combine({"a": a, "b": b}, 3, "round-robin").tolist() == [0, 4, 1, 3, 2]


def test_combined_score_reproduces_order() -> None:
    order = np.array([3, 0, 2, 1])
    s = combined_score(order)
    assert s.tolist() == [0.75, 0.25, 0.5, 1.0]
    assert rank_order(s, np.arange(4)).tolist() == order.tolist()


def test_unknown_mode_and_length_mismatch() -> None:
    with pytest.raises(ConfigError):
        combine({"a": np.zeros(2)}, 1, "median")
    with pytest.raises(ConfigError):
        combine({"a": np.zeros(2), "b": np.zeros(3)}, 1, "max")


def test_coverage_report() -> None:
    a = np.array([5.0, 4.0, 3.0, 0.0])  # top2: {0, 1}
    b = np.array([5.0, 0.0, 3.0, 4.0])  # top2: {0, 3}
    rep = coverage_report({"a": a, "b": b}, np.array([0, 1]), {"a": 2, "b": 2})
    assert rep == {
        "coverage": {"a": {"k": 2, "in_coreset": 2}, "b": {"k": 2, "in_coreset": 1}},
        "overlap": {"a|b": 1},
    }
