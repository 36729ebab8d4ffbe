"""Combining per-target scores into one coreset (issue 14 §1): pure functions, no I/O.

Every function takes per-target score arrays over the same pool positions (position ``i``
in each array is the same record) and returns a combined **order**: a permutation of the
positions, best first, whose first ``k`` entries are the coreset.

Rankings, normalization and ties:

* a target's ranking is its score descending, ties by pool position (the same rule as
  :func:`coreselect.selection.rank_order`); ``-inf`` ranks last, NaN is refused;
* ``max`` / ``mean`` combine **rank-normalized** scores: the record at 0-based rank ``r`` in a
  pool of ``n`` gets ``(n - r) / n`` (best 1, worst 1/n). Ranks are robust to ``-inf`` and to
  targets whose raw scores live on different scales (a z-score is undefined once one score is
  ``-inf``); the price is that score gaps are ignored;
* ``quota`` (the default): the budget is split into per-target counts
  (:func:`quota_counts`); target after target (in the order given) takes its count of
  not-yet-taken records from its own ranking, so a record two targets want counts once and
  the later target's next best fills its slot. Past the budget the order continues by the
  ``max`` rule;
* ``round-robin``: targets take turns (in the order given) picking their best record not yet
  taken, until the pool is exhausted.

:func:`combined_score` turns an order into a float score (``(n - position) / n``) whose
ranking under the usual rule reproduces the order, which is what ``scores.parquet``'s
combined ``score`` column holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from coreselect.errors import ConfigError

COMBINE_MODES = ("quota", "max", "mean", "round-robin")


def target_order(scores: np.ndarray) -> np.ndarray:
    """Positions best first: score descending, ties by position; NaN refused."""
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ConfigError("scores contain NaN")
    return np.lexsort((np.arange(len(s)), -s))


def rank_normalized(scores: np.ndarray) -> np.ndarray:
    """``(n - r) / n`` for the record at 0-based rank ``r`` (best 1.0, worst 1/n)."""
    order = target_order(scores)
    n = len(order)
    out = np.empty(n, dtype=np.float64)
    out[order] = (n - np.arange(n)) / n if n else np.zeros(0)
    return out


def parse_quota(spec: str | Mapping[str, object] | None, names: Sequence[str]) -> dict[str, float]:
    """Shares of the budget per target, summing to 1.

    ``spec`` is ``"csqa=50%,siqa=25%"`` (or a mapping; values are percentages ``"50%"`` or
    fractions ``0.5``). Targets it leaves out share what is left equally; when every target is
    named the shares are scaled to sum to 1. ``None`` / empty: equal split.
    """
    names = list(names)
    if not names:
        raise ConfigError("no targets to split the budget between")
    if spec is None or spec == "" or spec == {}:
        return {n: 1.0 / len(names) for n in names}
    items: dict[str, object]
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"--quota entries are NAME=SHARE, got {part.strip()!r}")
            name, share_text = part.split("=", 1)
            items[name.strip()] = share_text.strip()
    else:
        items = dict(spec)
    given: dict[str, float] = {}
    for key, val in items.items():
        if key not in names:
            raise ConfigError(f"--quota names an unknown target {key!r} (targets: {', '.join(names)})")
        text = str(val).strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ConfigError(f"--quota {key}={val!r}: not a percentage or fraction") from None
        if not 0 <= share <= 1 or share != share:
            raise ConfigError(f"--quota {key}={val!r}: share must lie in [0, 100%]")
        given[key] = share
    rest = [n for n in names if n not in given]
    total = sum(given.values())
    if rest:
        if total > 1 + 1e-9:
            raise ConfigError(f"--quota shares sum to {total:.0%}, over 100%")
        left = max(0.0, 1.0 - total)
        given.update({n: left / len(rest) for n in rest})
        total = sum(given.values())
    if total <= 0:
        raise ConfigError("--quota shares sum to 0")
    return {n: given[n] / total for n in names}


def quota_counts(k: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Integer counts summing to ``k`` (largest remainder; ties go to the earlier target)."""
    names = list(shares)
    exact = [k * shares[n] for n in names]
    counts = [int(np.floor(e + 1e-9)) for e in exact]
    left = k - sum(counts)
    by_rem = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_rem[:left]:
        counts[i] += 1
    return dict(zip(names, counts, strict=True))


def _check(scores: Mapping[str, np.ndarray]) -> int:
    if not scores:
        raise ConfigError("no per-target scores to combine")
    lengths = {len(s) for s in scores.values()}
    if len(lengths) != 1:
        raise ConfigError(f"per-target scores differ in length: {sorted(lengths)}")
    return lengths.pop()


def order_by_value(values: np.ndarray) -> np.ndarray:
    """Positions by ``values`` descending, ties by position."""
    return np.lexsort((np.arange(len(values)), -np.asarray(values, dtype=np.float64)))


def combine_max(scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """Order by the best rank-normalized score any target gives a record."""
    _check(scores)
    return order_by_value(np.max([rank_normalized(s) for s in scores.values()], axis=0))


def combine_mean(scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """Order by the mean rank-normalized score over targets."""
    _check(scores)
    return order_by_value(np.mean([rank_normalized(s) for s in scores.values()], axis=0))


def combine_round_robin(scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """Targets take turns taking their best record not yet taken."""
    n = _check(scores)
    orders = [target_order(s) for s in scores.values()]
    taken = np.zeros(n, dtype=bool)
    pos = [0] * len(orders)
    out: list[int] = []
    while len(out) < n:
        for t, order in enumerate(orders):
            while pos[t] < n and taken[order[pos[t]]]:
                pos[t] += 1
            if pos[t] < n:
                i = int(order[pos[t]])
                taken[i] = True
                out.append(i)
    return np.asarray(out, dtype=np.int64)


def combine_quota(scores: Mapping[str, np.ndarray], k: int, shares: Mapping[str, float] | None = None) -> np.ndarray:
    """Each target takes its quota from its own ranking (overlaps count once); then ``max`` order."""
    n = _check(scores)
    k = max(0, min(int(k), n))
    counts = quota_counts(k, shares if shares is not None else parse_quota(None, list(scores)))
    taken = np.zeros(n, dtype=bool)
    out: list[int] = []
    for name, s in scores.items():
        want = counts.get(name, 0)
        for i in target_order(s):
            if want == 0:
                break
            if not taken[i]:
                taken[i] = True
                out.append(int(i))
                want -= 1
    rest = [int(i) for i in combine_max(scores) if not taken[i]]
    return np.asarray(out + rest, dtype=np.int64)


def combine(
    scores: Mapping[str, np.ndarray], k: int, how: str = "quota", shares: Mapping[str, float] | None = None
) -> np.ndarray:
    """The combined order for ``how`` in :data:`COMBINE_MODES`."""
    if how == "quota":
        return combine_quota(scores, k, shares)
    if how == "max":
        return combine_max(scores)
    if how == "mean":
        return combine_mean(scores)
    if how == "round-robin":
        return combine_round_robin(scores)
    raise ConfigError(f"--combine must be one of {', '.join(COMBINE_MODES)}, got {how!r}")


def combined_score(order: np.ndarray) -> np.ndarray:
    """``(n - position) / n`` per record: ranking it (ties by position) gives back ``order``."""
    n = len(order)
    out = np.empty(n, dtype=np.float64)
    out[np.asarray(order, dtype=np.int64)] = (n - np.arange(n)) / n if n else np.zeros(0)
    return out


def coverage_report(
    scores: Mapping[str, np.ndarray], selected: np.ndarray, top_k: Mapping[str, int]
) -> dict[str, object]:
    """Per target, how many selected records sit in its own top ``top_k[name]``; pairwise overlap of those top sets."""
    sel = {int(i) for i in np.asarray(selected).ravel()}
    tops = {name: {int(i) for i in target_order(s)[: top_k[name]]} for name, s in scores.items()}
    coverage = {name: {"k": top_k[name], "in_coreset": len(top & sel)} for name, top in tops.items()}
    names = list(tops)
    overlap = {f"{a}|{b}": len(tops[a] & tops[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    return {"coverage": coverage, "overlap": overlap}
