"""Shared by every method: budgets, ranking, score shards, and writing the outputs.

Output folder layout::

    DIR/shards/scores-00000.parquet   one per scored chunk, written as it finishes (resume)
    DIR/scores.parquet                index, id, source, n_tokens, n_scored, score, rank, selected
    DIR/coreset.jsonl                 the selected records verbatim, best first
    DIR/run.json                      settings, versions, counts, per-stage wall time

Ranking: higher score first; ties broken by pool position (lower index first); ``-inf``
last. Every file is written to a temp file and renamed, so a killed run never leaves a
truncated output.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coreselect.data.records import Record
from coreselect.errors import ConfigError, CoreselectError
from coreselect.io import atomic_path, write_jsonl
from coreselect.methods.base import ScoreChunk

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


def parse_budget(budget: str | int | float, n_pool: int) -> int:
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
    return pa.table(
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


def read_scores(paths: Sequence[Path]) -> pa.Table:
    tables = [pq.read_table(p, schema=SCORE_SCHEMA) for p in paths]
    if not tables:
        return SCORE_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("index")


# ---------------------------------------------------------------------------- outputs


def finalize_scores(table: pa.Table, k: int, out_dir: Path) -> pa.Table:
    """Add ``rank`` (1 = best) and ``selected`` and write ``scores.parquet``."""
    index = table.column("index").to_numpy()
    if len(np.unique(index)) != len(index):
        raise CoreselectError("duplicate pool indices in the score shards (mixed runs in one --out?)")
    scores = table.column("score").to_numpy()
    order = rank_order(scores, index)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    table = table.append_column("rank", pa.array(rank, pa.int64()))
    table = table.append_column("selected", pa.array(rank <= k, pa.bool_()))
    with atomic_path(out_dir / "scores.parquet") as tmp:
        pq.write_table(table, tmp)
    return table


def selected_indices(table: pa.Table) -> list[int]:
    """Pool indices of the selected records, best first."""
    sel = table.filter(table.column("selected")).sort_by("rank")
    return sel.column("index").to_pylist()


def write_coreset(records: Iterable[Record], chosen: Sequence[int], out_dir: Path) -> int:
    """Write the chosen records verbatim, in the given (rank) order, by streaming the pool once."""
    want = {int(i): r for r, i in enumerate(chosen)}
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
    if any(out_dir.iterdir()):
        raise CoreselectError(f"{out_dir}: output folder exists and is not empty (use --overwrite or --resume)")


def clear_outputs(out_dir: Path) -> None:
    """With ``--overwrite``: remove what a previous run in this folder left (score shards)."""
    for p in (out_dir / "shards").glob("scores-*.parquet"):
        p.unlink()


def run_json(out_dir: Path) -> dict[str, Any]:
    p = out_dir / "run.json"
    return json.loads(p.read_text()) if p.exists() else {}


def iter_chunks(chunks: Iterator[ScoreChunk]) -> Iterator[ScoreChunk]:  # pragma: no cover - trivial
    yield from chunks
