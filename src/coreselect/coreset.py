"""Read a finished selection run back: ``coreselect.load_coreset(out_dir)`` -> ``datasets.Dataset``.

The coreset's records come verbatim from ``coreset.jsonl`` (best first), with the run's
scores joined from ``scores.parquet`` as extra columns:

=============== ==========================================================================
``score``       the method's score (higher = more useful for the target)
``rank``        1 = best; the coreset holds ranks 1..k
``n_tokens``    tokens of the record as the scoring model saw it (0 for model-free methods)
``n_scored``    tokens that entered the score (TRIM: tokens in ``--scope``)
``pool_index``  0-based position in the pool (all pool inputs concatenated, rejects skipped)
``pool_id``     the record's id: its ``id`` field, else ``"<source>:<line or row>"``
``pool_source`` its ``dataset`` field, else the pool file's stem / the Dataset's name
=============== ==========================================================================

A record field with one of these names keeps its name and value; the score column then gets a
``coreselect_`` prefix (``coreselect_score``), so nothing of the record is ever overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from coreselect.errors import CoreselectError

__all__ = ["SCORE_COLUMNS", "load_coreset", "selected_rows"]

log = logging.getLogger("coreselect")

#: scores.parquet column -> column name in the loaded coreset
SCORE_COLUMNS = {
    "score": "score",
    "rank": "rank",
    "n_tokens": "n_tokens",
    "n_scored": "n_scored",
    "index": "pool_index",
    "id": "pool_id",
    "source": "pool_source",
}


def _check_run_dir(d: Path) -> None:
    """Raise a one-line error naming what ``d`` is when it holds no finished selection."""
    if not d.is_dir():
        raise CoreselectError(f"{d}: no such run folder")
    if (d / "coreset.jsonl").is_file() and (d / "scores.parquet").is_file():
        return
    if (d / "comparison.md").is_file() or (d / "comparison.json").is_file():
        runs = sorted(p.name for p in d.iterdir() if (p / "coreset.jsonl").is_file())
        raise CoreselectError(f"{d}: a compare folder; pass one of its method folders ({', '.join(runs) or 'none'})")
    if list(d.glob("run-shard-*.json")):
        raise CoreselectError(f"{d}: holds score shards only; run coreselect merge once every shard is done")
    missing = "coreset.jsonl" if not (d / "coreset.jsonl").is_file() else "scores.parquet"
    raise CoreselectError(f"{d}: not a finished selection run (no {missing})")


def selected_rows(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The ``scores.parquet`` rows of the coreset, best first (rank 1..k)."""
    import pyarrow.parquet as pq

    d = Path(out_dir)
    _check_run_dir(d)
    try:
        table = pq.read_table(d / "scores.parquet")
    except Exception as e:
        raise CoreselectError(f"{d / 'scores.parquet'}: cannot read: {' '.join(str(e).splitlines())[:200]}") from e
    if "selected" not in table.column_names or "rank" not in table.column_names:
        raise CoreselectError(f"{d / 'scores.parquet'}: no rank/selected columns (not a finished run)")
    return table.filter(table.column("selected")).sort_by("rank").to_pylist()


def _read_coreset(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise CoreselectError(f"{path}:{n}: invalid JSON: {e}") from None
    return rows


def load_records_with_scores(out_dir: str | os.PathLike[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(record, its scores.parquet row)`` for each coreset record, best first.

    Checks that ``coreset.jsonl`` and ``scores.parquet`` describe the same selection (same count,
    and the same ids where records carry an ``id`` field).
    """
    d = Path(out_dir)
    scores = selected_rows(d)
    records = _read_coreset(d / "coreset.jsonl")
    if len(records) != len(scores):
        raise CoreselectError(
            f"{d}: coreset.jsonl has {len(records)} records but scores.parquet selects "
            f"{len(scores)} (the folder mixes two runs; rerun select with --overwrite)"
        )
    for n, (rec, sc) in enumerate(zip(records, scores, strict=True), 1):
        rid = rec.get("id") if isinstance(rec, dict) else None
        if rid is not None and str(rid).strip() and str(rid) != sc["id"]:
            raise CoreselectError(
                f"{d / 'coreset.jsonl'}:{n}: id {str(rid)!r} but scores.parquet rank {n} is "
                f"{sc['id']!r} (the folder mixes two runs; rerun select with --overwrite)"
            )
    return list(zip(records, scores, strict=True))


def load_coreset(out_dir: str | os.PathLike[str], *, scores: bool = True) -> Any:
    """The coreset of a finished ``select`` run as a ``datasets.Dataset``, best record first.

    Args:
        out_dir: the run's output folder (``coreset.jsonl`` + ``scores.parquet``).
        scores: join the score columns (see the module docstring); ``False``: the records only.

    The records keep every field they had in the pool (a field missing in some records is
    ``None`` there). Raises :class:`CoreselectError` for a folder that holds no finished run.
    """
    import datasets

    d = Path(out_dir)
    pairs = load_records_with_scores(d)
    keys: dict[str, None] = {}
    for rec, _ in pairs:
        keys.update(dict.fromkeys(rec))
    columns: dict[str, list[Any]] = {k: [rec.get(k) for rec, _ in pairs] for k in keys}
    if scores:
        for src, name in SCORE_COLUMNS.items():
            col = name if name not in columns else f"coreselect_{name}"
            if col != name:
                log.warning("%s: records have a %r field; the scores' column is %r", d, name, col)
            columns[col] = [sc[src] for _, sc in pairs]
    info = datasets.DatasetInfo(
        dataset_name=d.resolve().name, description=f"coreselect coreset of {d.resolve()} (best first)"
    )
    try:
        return datasets.Dataset.from_dict(columns, info=info)
    except Exception as e:  # pyarrow cannot type a field that changes type between records
        raise CoreselectError(
            f"{d / 'coreset.jsonl'}: cannot make a Dataset of these records: "
            f"{type(e).__name__}: {' '.join(str(e).splitlines())[:200]}"
        ) from e
