"""``coreselect merge``: combine the score shards of ``--num-shards N`` processes.

Each shard process (``select --num-shards N --shard-index I``) writes
``DIR/shards/scores-NNNNN.parquet`` for its chunks and a ``run-shard-I.json``, and stops.
``merge`` reads the shards of one or several folders, checks that every pool record is
scored exactly once, ranks globally and writes ``scores.parquet``, ``coreset.jsonl`` and
``run.json`` into ``--out`` (the same outputs a single ``select`` writes).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coreselect.data.records import OnBadRecord
from coreselect.errors import ConfigError, CoreselectError
from coreselect.io import write_json


@dataclass
class MergeArgs:
    """Arguments of ``coreselect merge``.

    Attributes:
        out: folder that receives scores.parquet, coreset.jsonl and run.json.
        pool: the pool files the shard processes scored (same order).
        budget: ``5%`` of the pool or an absolute count.
        inputs: folders holding ``shards/scores-*.parquet`` (default: ``--out`` only).
        on_bad_record: what the shard processes used (``error`` or ``skip``), so pool
            positions agree.
    """

    out: str = ""
    pool: list[str] = field(default_factory=list)
    budget: str = "5%"
    inputs: list[str] = field(default_factory=list)
    on_bad_record: OnBadRecord = "error"

    def __post_init__(self) -> None:
        if isinstance(self.pool, str):
            self.pool = [self.pool]
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        self.budget = str(self.budget)

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("no output folder given (--out DIR)")
        if not self.pool:
            raise ConfigError("no pool given (--pool FILE [FILE ...])")
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"on_bad_record must be error or skip, got {self.on_bad_record!r}")
        for d in self.input_dirs():
            if not (d / "shards").is_dir():
                raise CoreselectError(f"{d}: no shards/ folder (not a shard-process output)")

    def input_dirs(self) -> list[Path]:
        return [Path(p) for p in (self.inputs or [self.out])]


def merge(args: MergeArgs) -> dict[str, Any]:
    """Merge shard outputs into the final selection; returns the ``run.json`` dictionary."""
    from coreselect.config import SelectArgs
    from coreselect.runtime import iter_pool, scan_pool, versions
    from coreselect.selection import (
        check_coverage,
        existing_shards,
        finalize_scores,
        parse_budget,
        read_scores,
        selected_indices,
        write_coreset,
    )

    t_start = time.perf_counter()
    args.validate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_args = SelectArgs(pool=args.pool, out=args.out, on_bad_record=args.on_bad_record)
    n_pool, rejects = scan_pool(pool_args)
    k = parse_budget(args.budget, n_pool)

    paths: list[Path] = []
    shard_runs: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for d in args.input_dirs():
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        paths += [p for _, p in sorted(existing_shards(d).items())]
        for rj in sorted(d.glob("run-shard-*.json")):
            shard_runs.append(json.loads(rj.read_text(encoding="utf-8")))
    if not paths:
        raise CoreselectError("no score shards found in " + ", ".join(str(d) for d in args.input_dirs()))
    table = read_scores(paths)
    check_coverage(table, n_pool, ", ".join(str(d) for d in args.input_dirs()))
    t0 = time.perf_counter()
    table = finalize_scores(table, k, out)
    chosen = selected_indices(table)
    write_coreset(iter_pool(pool_args), chosen, out)
    scores = table.column("score").to_numpy()
    methods = sorted({r.get("method", "") for r in shard_runs} - {""})
    info: dict[str, Any] = {
        "command": "merge",
        "method": methods[0] if len(methods) == 1 else ",".join(methods) or "unknown",
        "settings": asdict(args),
        "method_settings": shard_runs[0].get("method_settings", {}) if shard_runs else {},
        "versions": versions(),
        "counts": {
            "pool": n_pool,
            "selected": len(chosen),
            "rejected": rejects.count,
            "shards": len(paths),
            "shard_processes": len(shard_runs),
            "scored_minus_inf": int((scores == float("-inf")).sum()),
            "truncated": sum(int(r.get("counts", {}).get("truncated", 0)) for r in shard_runs),
        },
        "timings": {"write_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t_start},
        "shard_runs": [
            {"shard": r.get("shard"), "timings": r.get("timings"), "stats": r.get("stats")} for r in shard_runs
        ],
    }
    write_json(out / "run.json", info)
    return info
