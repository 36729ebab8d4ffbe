"""Paired bootstrap of two systems scored on the same items.

Used by ``coreselect experiment`` to compare a reference method (TRIM) with every other row
on the same test items (lm-eval accuracy per item) and the same held-out examples (response
loss per example). Pairing removes the between-item variance that dominates at a few hundred
items: the statistic is the mean over items of the per-item difference, and every resample
draws items (with replacement) and keeps both systems' values of each drawn item together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coreselect.errors import CoreselectError

__all__ = ["paired_bootstrap"]


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, iters: int = 10000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean difference ``mean(a - b)`` over paired items with a percentile bootstrap interval.

    Args:
        a, b: per-item values of the two systems, item ``i`` of ``a`` paired with item ``i`` of ``b``.
        iters: resamples of the items (with replacement, ``n`` items each).
        seed: seeds the resampling (numpy ``default_rng``).
        level: coverage of the percentile interval.

    Returns:
        ``{"diff", "lo", "hi", "p_le0", "p_ge0", "n", "iters"}``: the observed mean difference,
        the ``level`` percentile interval of the resampled means, and the fractions of
        resampled means ``<= 0`` and ``>= 0`` (a one-sided bootstrap p-value for ``a > b``
        and for ``a < b``).

    Raises:
        CoreselectError: the two sides differ in length, or have no item.
    """
    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(a) != len(b) or x.size == 0:
        raise CoreselectError(f"paired bootstrap needs two equally long, non-empty sides, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    means = np.empty(iters, dtype=np.float64)
    for start in range(0, iters, 1000):  # bounded memory: 1000 resamples x n items at a time
        m = min(1000, iters - start)
        means[start : start + m] = x[rng.integers(0, x.size, size=(m, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return {
        "diff": float(x.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "p_le0": float((means <= 0).mean()),
        "p_ge0": float((means >= 0).mean()),
        "n": int(x.size),
        "iters": int(iters),
    }
