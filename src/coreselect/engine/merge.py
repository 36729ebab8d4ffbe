"""``coreselect merge``: combine the score shards of ``--num-shards N`` processes.

Each shard process (``select --num-shards N --shard-index I``) writes
``DIR/shards/scores-NNNNN.parquet`` for its chunks and a ``run-shard-I.json``, and stops.
``merge`` reads the shards of one or several folders, checks that every pool record is
scored exactly once, ranks globally and writes ``scores.parquet``, ``coreset.jsonl`` and
``run.json`` into ``--out`` (the same outputs a single ``select`` writes).

Several named targets (``select --target a=F b=G --num-shards N``): every shard carries a
``score_<name>`` column per target; ``merge`` combines them as ``select`` does
(:func:`coreselect.selection.finalize_multi`: ``rank_<name>`` columns, run.json ``targets``
with coverage and overlap), with the ``--combine`` / ``--quota`` the shard processes were
given, or those passed to ``merge`` (re-combining needs no rescoring).
"""

from __future__ import annotations

import contextlib
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
        combine: several named targets: ``quota``, ``max``, ``mean`` or ``round-robin``
            (default: what the shard processes were given).
        quota: several named targets, ``--combine quota``: budget shares ``a=50%,b=25%``
            (default: what the shard processes were given).
    """

    out: str = ""
    pool: list[str] = field(default_factory=list)
    budget: str = "5%"
    inputs: list[str] = field(default_factory=list)
    on_bad_record: OnBadRecord = "error"
    combine: str = ""
    quota: str = ""

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
        from coreselect.combine import COMBINE_MODES

        if self.combine and self.combine not in COMBINE_MODES:
            raise ConfigError(f"--combine must be one of {', '.join(COMBINE_MODES)}, got {self.combine!r}")
        for d in self.input_dirs():
            if not (d / "shards").is_dir():
                raise CoreselectError(f"{d}: no shards/ folder (not a shard-process output)")

    def input_dirs(self) -> list[Path]:
        return [Path(p) for p in (self.inputs or [self.out])]


def merge(args: MergeArgs) -> dict[str, Any]:
    """Merge shard outputs into the final selection; returns the ``run.json`` dictionary."""
    from coreselect.config import SelectArgs
    from coreselect.runtime import iter_pool, read_targets, scan_pool, versions
    from coreselect.selection import (
        check_coverage,
        existing_shards,
        finalize_multi,
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
    names = _target_names(paths, shard_runs)
    table = read_scores(paths)
    check_coverage(table, n_pool, ", ".join(str(d) for d in args.input_dirs()))
    t0 = time.perf_counter()
    multi: dict[str, Any] | None = None
    if names:
        st = shard_runs[0].get("settings", {}) if shard_runs else {}
        how = args.combine or str(st.get("combine") or "quota")
        quota = args.quota or str(st.get("quota") or "")
        table, multi = finalize_multi(table, k, out, names, how, quota)
        with contextlib.suppress(CoreselectError, OSError, TypeError):  # target sizes, when the files are at hand
            multi["sizes"] = {n: len(r) for n, r in read_targets(SelectArgs.from_settings(st)).items()}
    elif args.combine or args.quota:
        raise ConfigError("--combine / --quota need shards scored for several named targets")
    else:
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
    if multi is not None:
        info["targets"] = multi
    write_json(out / "run.json", info)
    return info


def _target_names(paths: list[Path], shard_runs: list[dict[str, Any]]) -> list[str]:
    """The target names of shards scored for several named targets (``[]`` for one target), in
    the shard processes' ``--target`` order; every shard must carry the same ``score_<name>`` set."""
    import pyarrow.parquet as pq

    from coreselect.config import SelectArgs

    sets = {p: [f.name.removeprefix("score_") for f in pq.read_schema(p) if f.name.startswith("score_")] for p in paths}
    kinds = {tuple(sorted(v)) for v in sets.values()}
    if len(kinds) > 1:
        a, b = sorted(kinds)[:2]
        raise CoreselectError(
            f"the shards were scored for different targets ({', '.join(a) or 'one unnamed target'} vs "
            f"{', '.join(b) or 'one unnamed target'}): merge shards of one run only"
        )
    cols = next(iter(sets.values()), [])
    if len(cols) < 2:
        return []
    for r in shard_runs:
        try:
            given = list(SelectArgs.from_settings(r.get("settings", {})).target_sets())
        except (ConfigError, TypeError):
            continue
        if sorted(given) != sorted(cols):
            raise CoreselectError(
                f"shard process {r.get('shard', {}).get('shard_index', '?')} ran with targets {given}, "
                f"but the shards hold {cols}: merge shards of one run only"
            )
        return given
    return cols
