"""Paired bootstrap of two systems scored on the same items.

Used by ``coreselect experiment`` to compare a reference method (TRIM) with every other row
on the same test items (lm-eval accuracy per item) and the same held-out examples (response
loss per example). Pairing removes the between-item variance that dominates at a few hundred
items: the statistic is the mean over items of the per-item difference, and every resample
draws items (with replacement) and keeps both systems' values of each drawn item together.

With several fine-tuning seeds per system, the items are not the only source of noise: two
models trained on the same coreset with different seeds differ too, by as much as two methods
do at this scale. :func:`paired_bootstrap` then resamples at two levels, as a hierarchical
bootstrap does: each resample draws each system's seeds (with replacement, as many as it has)
and, independently, the items (paired); the statistic is the mean over the drawn items of the
difference between the two systems' means over their drawn seeds. With one seed per side it
is the plain paired item bootstrap.

:func:`detectable_difference` turns the bootstrap's standard error into the power statement a
reader needs next to an interval that includes 0: how large a true difference this design
would have found.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from coreselect.errors import CoreselectError

__all__ = ["detectable_difference", "paired_bootstrap"]


def paired_bootstrap(
    a: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    b: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    *,
    iters: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Mean difference of two systems over paired items, with a percentile bootstrap interval.

    Args:
        a, b: per-item values of the two systems, item ``i`` of ``a`` paired with item ``i`` of
            ``b``: one value per item (``[n]``), or one row per fine-tuning seed (``[seeds, n]``;
            the two sides may have different numbers of seeds). With rows, the seeds are
            resampled too (module docstring).
        iters: resamples.
        seed: seeds the resampling (numpy ``default_rng``).
        level: coverage of the percentile interval.

    Returns:
        ``{"diff", "lo", "hi", "se", "p_le0", "p_ge0", "n", "iters"}``: the observed mean
        difference (over all seeds and items), the ``level`` percentile interval of the
        resampled means, their standard deviation (the bootstrap standard error), and the
        fractions of resampled means ``<= 0`` and ``>= 0`` (a one-sided bootstrap p-value for
        ``a > b`` and for ``a < b``).

    Raises:
        CoreselectError: the two sides differ in items, or have none.
    """
    xa, xb = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    n = xa.shape[1]
    if xa.ndim != 2 or xb.ndim != 2 or xb.shape[1] != n or n == 0 or 0 in (xa.shape[0], xb.shape[0]):
        raise CoreselectError(
            f"paired bootstrap needs two equally long, non-empty sides, got {xa.shape[-1]} and {xb.shape[-1]}"
        )
    rng = np.random.default_rng(seed)
    means = np.empty(iters, dtype=np.float64)
    one_seed = xa.shape[0] == 1 and xb.shape[0] == 1
    x = xa[0] - xb[0] if one_seed else None
    for start in range(0, iters, 1000):  # bounded memory: 1000 resamples x n items at a time
        m = min(1000, iters - start)
        if x is not None:
            means[start : start + m] = x[rng.integers(0, n, size=(m, n))].mean(axis=1)
            continue
        # each resample's per-item means over its drawn seeds: seed draw counts / seeds @ values
        ma = _resampled_seed_means(xa, m, rng)
        mb = _resampled_seed_means(xb, m, rng)
        idx = rng.integers(0, n, size=(m, n))
        means[start : start + m] = np.take_along_axis(ma - mb, idx, axis=1).mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return {
        "diff": float(xa.mean() - xb.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "se": float(means.std(ddof=1)) if iters > 1 else 0.0,
        "p_le0": float((means <= 0).mean()),
        "p_ge0": float((means >= 0).mean()),
        "n": int(n),
        "iters": int(iters),
    }


def detectable_difference(se: float, *, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true difference a comparison with standard error ``se`` detects with ``power``.

    Normal approximation of the two-sided test at ``1 - level``:
    ``(z_{(1+level)/2} + z_{power}) * se`` (2.80 se for 95% and 80%). A method gap below it is
    one this design would miss more often than ``1 - power`` of the time, so an interval that
    includes 0 says little about a gap that small.
    """
    z = NormalDist()
    return (z.inv_cdf((1.0 + level) / 2.0) + z.inv_cdf(power)) * se


def _resampled_seed_means(x: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``[m, n]``: for each of ``m`` resamples, the per-item mean over ``S`` seeds drawn with
    replacement from the rows of ``x`` (``[S, n]``)."""
    s = x.shape[0]
    if s == 1:
        return np.broadcast_to(x, (m, x.shape[1]))
    draws = rng.integers(0, s, size=(m, s))
    weights = np.zeros((m, s), dtype=np.float64)
    np.add.at(weights, (np.arange(m)[:, None], draws), 1.0 / s)
    return weights @ x
