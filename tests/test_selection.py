"""Shared selection rules (coreselect.selection): budgets, ranking and ties, coverage, and the
one permission rule of every output file."""

from __future__ import annotations

import os
import stat

import numpy as np
import pyarrow as pa
import pytest

from coreselect.errors import ConfigError, CoreselectError
from coreselect.io import atomic_path, output_mode, write_json
from coreselect.selection import (
    SCORE_SCHEMA,
    check_coverage,
    finalize_scores,
    parse_budget,
    rank_order,
)


@pytest.mark.parametrize(
    ("budget", "n", "k"),
    [("5%", 100, 5), ("5%", 30, 2), ("100%", 7, 7), ("3", 10, 3), (4, 10, 4), ("0.5%", 1000, 5), (" 10 % ", 20, 2)],
)
def test_budget_parsing(budget, n, k):
    assert parse_budget(budget, n) == k


@pytest.mark.parametrize("budget", ["0", "0%", "101%", "-3", "11", "abc", "5 records"])
def test_bad_budgets_fail(budget):
    with pytest.raises(ConfigError):
        parse_budget(budget, 10)


def test_empty_pool_has_no_budget():
    with pytest.raises(CoreselectError):
        parse_budget("5%", 0)


def test_ties_go_to_the_lower_pool_position_and_minus_inf_last():
    scores = np.array([1.0, 2.0, 2.0, -np.inf, 2.0, 0.5])
    index = np.arange(6)
    assert rank_order(scores, index).tolist() == [1, 2, 4, 0, 5, 3]
    shuffled = np.array([4, 0, 5, 2, 3, 1])  # same records, read in another order
    assert index[shuffled][rank_order(scores[shuffled], index[shuffled])].tolist() == [1, 2, 4, 0, 5, 3]


def _table(idx):
    n = len(idx)
    return pa.table(
        {
            "index": pa.array(idx, pa.int64()),
            "id": [str(i) for i in idx],
            "source": ["s"] * n,
            "n_tokens": pa.array([0] * n, pa.int64()),
            "n_scored": pa.array([0] * n, pa.int64()),
            "score": pa.array(np.linspace(0, 1, n), pa.float64()),
        },
        schema=SCORE_SCHEMA,
    )


def test_coverage_needs_every_position_once():
    check_coverage(_table([2, 0, 1]), 3)
    for bad in ([0, 1], [0, 1, 1], [0, 1, 3]):
        with pytest.raises(CoreselectError):
            check_coverage(_table(bad), 3)


def test_finalize_ranks_and_marks_the_top_k(tmp_path):
    t = finalize_scores(_table([0, 1, 2, 3]), 2, tmp_path)
    assert t.column("selected").to_pylist().count(True) == 2
    assert sorted(t.column("rank").to_pylist()) == [1, 2, 3, 4]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_output_gets_the_umask_mode(tmp_path, umask):
    """atomic_path writes through mkstemp (0600) or a library's own file; the result is 0666 - umask."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        write_json(tmp_path / "run.json", {"a": 1})
        with atomic_path(tmp_path / "x.safetensors") as tmp:
            save_file({"t": torch.zeros(2)}, str(tmp))
        assert output_mode() == 0o666 & ~umask
    finally:
        os.umask(old)
    for name in ("run.json", "x.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
