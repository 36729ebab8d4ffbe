"""Shared by every method: budgets, ranking, score shards, and writing the outputs.

Output folder layout::

    DIR/shards/scores-00000.parquet   one per scored chunk, written as it finishes (resume);
                                      shard ``j`` holds pool positions ``[j*S, (j+1)*S)``
                                      (``S`` = ``--shard-records``) for streaming methods
    DIR/run-shard-I.json              with ``--num-shards N --shard-index I`` (no merge yet)
    DIR/scores.parquet                index, id, source, n_tokens, n_scored, score, rank, selected
    DIR/coreset.jsonl                 the selected records verbatim, best first
    DIR/run.json                      settings, versions, counts, per-stage wall time

Ranking: higher score first; ties broken by pool position (lower index first); ``-inf``
last. Every file is written to a temp file and renamed, so a killed run never leaves a
truncated output.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.io import atomic_path, write_jsonl
from coreselect.methods.base import ScoreChunk
from coreselect.runlock import is_lock_file

SCORE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("n_tokens", pa.int64()),
        ("n_scored", pa.int64()),
        ("score", pa.float64()),
    ]
)


def parse_budget(budget: str | float, n_pool: int) -> int:
    """Number of records to select: ``"5%"`` (of the pool, rounded up) or an absolute count.

    Raises ConfigError for 0, negative, more than 100% or more than the pool.
    """
    if n_pool <= 0:
        raise CoreselectError("the pool is empty")
    text = str(budget).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise ConfigError(f"budget {text} must be in (0%, 100%]")
        return max(1, math.ceil(n_pool * pct / 100 - 1e-9))
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"budget {budget!r} is neither a percentage like 5% nor a count") from None
    if k <= 0:
        raise ConfigError(f"budget must be positive, got {k}")
    if k > n_pool:
        raise ConfigError(f"budget {k} is larger than the pool ({n_pool} records)")
    return k


def rank_order(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Positions sorted best first: score descending, then pool index ascending."""
    if np.isnan(scores).any():
        raise CoreselectError("scores contain NaN")
    return np.lexsort((index, -scores))


# ---------------------------------------------------------------------------- shards


def shard_path(out_dir: Path, i: int) -> Path:
    return out_dir / "shards" / f"scores-{i:05d}.parquet"


def chunk_table(chunk: ScoreChunk) -> pa.Table:
    table = pa.table(
        {
            "index": pa.array(chunk.index, pa.int64()),
            "id": pa.array(chunk.ids, pa.string()),
            "source": pa.array(chunk.sources, pa.string()),
            "n_tokens": pa.array(chunk.n_tokens, pa.int64()),
            "n_scored": pa.array(chunk.n_scored, pa.int64()),
            "score": pa.array(chunk.score, pa.float64()),
        },
        schema=SCORE_SCHEMA,
    )
    for name, scores in chunk.targets.items():  # several targets: score_<name> per target
        table = table.append_column(f"score_{name}", pa.array(scores, pa.float64()))
    return table


def write_shard(out_dir: Path, i: int, chunk: ScoreChunk) -> Path:
    path = shard_path(out_dir, i)
    with atomic_path(path) as tmp:
        pq.write_table(chunk_table(chunk), tmp)
    return path


def existing_shards(out_dir: Path) -> dict[int, Path]:
    """Complete shards already on disk (temp files are never named like a shard)."""
    found = {}
    for p in sorted((out_dir / "shards").glob("scores-*.parquet")):
        found[int(p.stem.split("-")[1])] = p
    return found


def owns_shard(j: int, num_shards: int = 1, shard_index: int = 0) -> bool:
    """Whether shard chunk ``j`` belongs to process ``shard_index`` of ``num_shards``."""
    return j % num_shards == shard_index


def chunk_span(j: int, shard_records: int, n_pool: int) -> tuple[int, int]:
    """Pool positions ``[lo, hi)`` of shard chunk ``j``."""
    return j * shard_records, min((j + 1) * shard_records, n_pool)


def chunk_records(chunks: Iterable[int], shard_records: int, n_pool: int) -> int:
    """Number of pool records the shard chunks ``chunks`` hold."""
    return sum(hi - lo for lo, hi in (chunk_span(j, shard_records, n_pool) for j in chunks))


def plan_shards(
    out_dir: Path, n_pool: int, shard_records: int, num_shards: int = 1, shard_index: int = 0, *, resume: bool = False
) -> tuple[list[int], list[int]]:
    """``(done, todo)``: this process's shard chunks already complete on disk, and those left.

    A complete shard ``j`` must hold exactly pool positions ``[j*S, min((j+1)*S, n_pool))``;
    anything else means the pool or ``--shard-records`` changed since it was written.
    """
    n_chunks = -(-n_pool // shard_records)
    mine = [j for j in range(n_chunks) if owns_shard(j, num_shards, shard_index)]
    found = existing_shards(out_dir) if resume else {}
    done = []
    for j in mine:
        if j not in found:
            continue
        lo, hi = chunk_span(j, shard_records, n_pool)
        try:
            idx = pq.read_table(found[j], columns=["index"]).column(0).to_numpy()
        except (OSError, pa.ArrowException) as e:
            raise CoreselectError(f"{found[j]}: unreadable score shard ({e}); use --overwrite") from None
        if len(idx) != hi - lo or (len(idx) and (idx.min() != lo or idx.max() != hi - 1)):
            raise CoreselectError(
                f"{found[j]}: holds other pool positions than [{lo}, {hi}) (the pool or "
                "--shard-records changed since the interrupted run; use --overwrite)"
            )
        done.append(j)
    todo = [j for j in mine if j not in found]
    return done, todo


def check_coverage(table: pa.Table, n_pool: int, where: str = "scores") -> None:
    """Every pool position ``0..n_pool-1`` must be scored exactly once."""
    idx = np.sort(table.column("index").to_numpy())
    if (
        len(idx) == n_pool
        and (n_pool == 0 or (idx[0] == 0 and idx[-1] == n_pool - 1))
        and (len(idx) < 2 or bool((np.diff(idx) == 1).all()))
    ):
        return
    dup = idx[1:][idx[1:] == idx[:-1]]
    if dup.size:
        raise CoreselectError(
            f"{where}: pool record index {int(dup[0])} is scored more than once (overlapping shards or mixed runs)"
        )
    beyond = idx[(idx < 0) | (idx >= n_pool)]
    if beyond.size:
        raise CoreselectError(
            f"{where}: score for index {int(beyond[0])} but the pool has {n_pool} records "
            "(the pool changed since scoring)"
        )
    missing = np.setdiff1d(np.arange(n_pool), idx)
    raise CoreselectError(
        f"{where}: {missing.size} of {n_pool} pool records have no score "
        f"(first: index {int(missing[0])}; a shard process has not finished?)"
    )


def read_scores(paths: Sequence[Path]) -> pa.Table:
    tables = [pq.read_table(p, schema=_shard_schema(p)) for p in paths]
    if not tables:
        return SCORE_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("index")


def _shard_schema(path: Path) -> pa.Schema:
    """:data:`SCORE_SCHEMA` plus the shard's per-target ``score_<name>`` columns, if any."""
    extra = [f for f in pq.read_schema(path) if f.name.startswith("score_")]
    return pa.schema([*SCORE_SCHEMA, *(pa.field(f.name, pa.float64()) for f in extra)]) if extra else SCORE_SCHEMA


# ---------------------------------------------------------------------------- outputs


def finalize_scores(table: pa.Table, k: int, out_dir: Path) -> pa.Table:
    """Add ``rank`` (1 = best) and ``selected`` and write ``scores.parquet``.

    ``table`` must have passed :func:`check_coverage` (every pool position exactly once).
    """
    index = table.column("index").to_numpy()
    scores = table.column("score").to_numpy()
    order = rank_order(scores, index)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    table = table.append_column("rank", pa.array(rank, pa.int64()))
    table = table.append_column("selected", pa.array(rank <= k, pa.bool_()))
    with atomic_path(out_dir / "scores.parquet") as tmp:
        pq.write_table(table, tmp)
    return table


def finalize_multi(
    table: pa.Table, k: int, out_dir: Path, names: Sequence[str], how: str, quota: str = ""
) -> tuple[pa.Table, dict[str, Any]]:
    """Several targets: combine the ``score_<name>`` columns (:mod:`coreselect.combine`), then
    write ``scores.parquet`` with the combined ``score`` / ``rank`` / ``selected`` and a
    ``rank_<name>`` per target. Returns the table and run.json's ``targets`` entry (shares,
    coverage of each target's own top-k, pairwise overlap of those top-k sets)."""
    from coreselect.combine import combine, combined_score, coverage_report, parse_quota, quota_counts

    per = {n: table.column(f"score_{n}").to_numpy() for n in names}
    shares = parse_quota(quota or None, list(names))
    order = combine(per, k, how, shares)
    table = table.set_column(table.schema.get_field_index("score"), "score", pa.array(combined_score(order)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    table = table.append_column("rank", pa.array(rank, pa.int64()))
    table = table.append_column("selected", pa.array(rank <= k, pa.bool_()))
    index = table.column("index").to_numpy()
    for n, s in per.items():
        r = np.empty(len(s), dtype=np.int64)
        r[rank_order(s, index)] = np.arange(1, len(s) + 1)
        table = table.append_column(f"rank_{n}", pa.array(r, pa.int64()))
    base = [*SCORE_SCHEMA.names, "rank", "selected"]
    table = table.select(base + [c for n in names for c in (f"score_{n}", f"rank_{n}")])
    with atomic_path(out_dir / "scores.parquet") as tmp:
        pq.write_table(table, tmp)
    top_k = quota_counts(k, shares) if how == "quota" else dict.fromkeys(names, k)
    info = {"names": list(names), "combine": how, "quota": shares, **coverage_report(per, order[:k], top_k)}
    return table, info


def selected_indices(table: pa.Table) -> list[int]:
    """Pool indices of the selected records, best first."""
    sel = table.filter(table.column("selected")).sort_by("rank")
    return sel.column("index").to_pylist()


def write_coreset(records: Iterable[Record], chosen: Sequence[int], out_dir: Path) -> int:
    """Write the chosen records verbatim, in the given (rank) order, by streaming the pool once."""
    want = {int(i) for i in chosen}
    got: dict[int, dict[str, Any]] = {}
    for rec in records:
        if rec.index in want:
            got[rec.index] = rec.raw
            if len(got) == len(want):
                break
    missing = [i for i in chosen if int(i) not in got]
    if missing:
        raise CoreselectError(f"pool changed since scoring: record index {missing[0]} not found")
    return write_jsonl(out_dir / "coreset.jsonl", (got[int(i)] for i in chosen))


def check_out_dir(out_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber a previous run unless ``overwrite`` (or continuing it with ``resume``)."""
    if resume or overwrite or not out_dir.exists():
        return
    if any(not is_lock_file(p) for p in out_dir.iterdir()):  # a lock left by a clean exit is not a run
        raise CoreselectError(f"{out_dir}: output folder exists and is not empty (use --overwrite or --resume)")


def check_shard_out_dir(out_dir: Path, num_shards: int, shard_index: int, *, overwrite: bool, resume: bool) -> None:
    """``check_out_dir`` for one of several shard processes sharing ``out_dir``: only this
    process's own shards (or its ``run-shard-I.json``) count as a previous run."""
    if resume or overwrite or not out_dir.exists():
        return
    own = [p for j, p in existing_shards(out_dir).items() if owns_shard(j, num_shards, shard_index)]
    if own or (out_dir / f"run-shard-{shard_index}.json").exists():
        raise CoreselectError(
            f"{out_dir}: holds shards of a previous shard-{shard_index} run (use --overwrite or --resume)"
        )


def clear_outputs(out_dir: Path, num_shards: int = 1, shard_index: int = 0) -> None:
    """With ``--overwrite``: remove what a previous run in this folder left (score shards —
    with several shard processes, only this one's — and its rejects log)."""
    for j, p in existing_shards(out_dir).items():
        if owns_shard(j, num_shards, shard_index):
            p.unlink()
    if num_shards == 1:
        (out_dir / "rejects.jsonl").unlink(missing_ok=True)


_SHARD_TMP = re.compile(r"\.scores-(\d+)\.parquet\..*\.tmp")


def remove_stale_temp(out_dir: Path, num_shards: int = 1, shard_index: int = 0) -> int:
    """Delete the temp files (``.NAME.XXXX.tmp``, see :func:`coreselect.io.atomic_path`) a killed
    run left behind. With several shard processes sharing ``out_dir`` only this process's shard
    temp files are touched (the others may be writing theirs right now)."""
    n = 0
    stale = list((out_dir / "shards").glob(".scores-*.tmp"))
    if num_shards == 1:
        stale += list(out_dir.glob(".*.tmp"))
    for p in stale:
        m = _SHARD_TMP.fullmatch(p.name)
        if m and not owns_shard(int(m.group(1)), num_shards, shard_index):
            continue
        p.unlink(missing_ok=True)
        n += 1
    return n
