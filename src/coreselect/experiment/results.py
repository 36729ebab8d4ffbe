"""What an experiment's files on disk add up to: each row's scores and costs, the paired
bootstrap comparisons, the coresets' source mix, length and perplexity skews, rank agreement,
stage times and hardware, written out by :func:`write_all`."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coreselect.eval.command import metric_name
from coreselect.experiment.args import ExperimentArgs, row_plan, uses_warmup
from coreselect.experiment.layout import (
    budget_tag,
    pretrained_dir,
    read_stage,
    selection_dir,
    setting_root,
    task_label,
)
from coreselect.experiment.tables import write_results
from coreselect.io import write_json
from coreselect.runtime import versions


def _first_seed_selections(args: ExperimentArgs, tasks: list[str], root: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """``({"row", "budget", "task"}, selection folder)`` of every row's first-seed coreset(s)."""
    owners: list[str | None] = [None] if args.coresets == "joint" else list(tasks)
    for method in args.methods:
        plan = row_plan(method, args.variants)
        for budget in args.budgets:
            for owner in owners:
                where = {"row": plan.label, "budget": budget, "task": task_label(owner) if owner else "joint"}
                yield where, selection_dir(args, root, owner, plan.select, budget, args.seeds[0])


def _scores_folder(sel: Path) -> Path:
    """The folder holding a selection's ``scores.parquet``: its own, or, for a per-task coreset
    cut from a multi-target pass (``derived_from`` in its run.json), that pass's."""
    return Path((read_stage(sel / "run.json") or {}).get("derived_from") or sel)


def coreset_mix(
    args: ExperimentArgs, tasks: list[str], root: Path, pool: list[str] | None = None
) -> list[dict[str, Any]]:
    """The source mix (records' ``dataset`` field) of each row's seed-0 coreset(s), and, given the
    setting's ``pool``, its length bias: mean length of the coreset and of the pool, and per task
    :func:`coreselect.compare.length_bias` of the selection's ``score_<task>`` (or ``score``).

    Length is the record's characters (every message's content), so that the table needs no
    tokenizer; a rank correlation is the same for any length unit that grows with it.
    """
    from collections import Counter

    import numpy as np

    from coreselect.compare import length_bias
    from coreselect.data.readers import pool_records

    chars: dict[int, int] = {}
    if pool:
        for rec in pool_records(pool):
            chars[rec.index] = sum(len(m.content) for m in rec.messages)
    pool_chars = statistics.fmean(chars.values()) if chars else None
    found: list[dict[str, Any]] = []
    for where, sel in _first_seed_selections(args, tasks, root):
        path = sel / "coreset.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        mix = Counter(str(r.get("dataset") or r.get("source") or "?") for r in rows)
        entry: dict[str, Any] = {**where, "n": len(rows), "mix": dict(sorted(mix.items()))}
        scores_path = _scores_folder(sel) / "scores.parquet"
        if chars and scores_path.is_file():
            import pyarrow.parquet as pq

            table = pq.read_table(scores_path)
            index = table.column("index").to_pylist()
            if all(i in chars for i in index):
                lengths = np.array([chars[i] for i in index])
                mine = [_raw_chars(r) for r in rows]
                rho: dict[str, float | None] = {}
                for task in tasks:
                    col = f"score_{task}" if f"score_{task}" in table.column_names else None
                    if col is None and where["task"] == task_label(task):
                        col = "score"
                    if col is not None:
                        rho[task_label(task)] = length_bias(table.column(col).to_numpy(), lengths)
                entry.update(chars=statistics.fmean(mine) if mine else None, pool_chars=pool_chars)
                entry["length_rho"] = rho
        found.append(entry)
    return found


def rank_agreement(args: ExperimentArgs, tasks: list[str], root: Path) -> list[dict[str, Any]]:
    """How closely each row's seed-0 ranking follows the ``bootstrap_reference`` row's, per task:
    Spearman's rho of their ``score_<task>`` rankings and the Jaccard overlap of their own
    top-k for that task (:func:`coreselect.compare.target_comparison`), plus the records the two
    coresets share. Multi-target selections only (joint, or per-task cut from one pass)."""
    import pyarrow.parquet as pq

    from coreselect.compare import target_comparison

    ref = args.bootstrap_reference
    tables: dict[str, Any] = {}
    runs: dict[str, dict[str, Any]] = {}
    ids: dict[str, set[str]] = {}
    for where, sel in _first_seed_selections(args, tasks, root):
        shared = _scores_folder(sel)
        key = where["row"] if len(args.budgets) == 1 else f"{where['row']} {where['budget']}"
        if key in tables or not (shared / "scores.parquet").is_file():
            continue
        tables[key] = pq.read_table(shared / "scores.parquet")
        runs[key] = read_stage(shared / "run.json") or {}
        ids[key] = {str(i) for i in tables[key].filter(tables[key].column("selected")).column("id").to_pylist()}
    refs = [k for k in tables if k == ref or k.startswith(f"{ref} ")]
    if not refs:
        return []
    cmp = target_comparison(tables, runs)
    if not cmp:
        return []
    r0 = refs[0]

    def vs_ref(kind: str, k: str) -> dict[str, float | None]:
        return {n: (cmp.get(n) or {}).get(kind, {}).get(k, {}).get(r0) for n in map(task_label, tasks)}

    return [
        {
            "row": k,
            "reference": r0,
            "spearman": vs_ref("spearman", k),
            "jaccard": vs_ref("jaccard", k),
            "shared": len(ids[k] & ids[r0]),
            "n": len(ids[k]),
        }
        for k in tables
        if k != r0
    ]


def _raw_chars(raw: dict[str, Any]) -> int:
    """Characters of a raw coreset record: its ``text``, or every message's content."""
    if "text" in raw:
        return len(str(raw["text"]))
    return sum(len(str(m.get("content", ""))) for m in raw.get("messages") or [])


def ppl_skews(args: ExperimentArgs, tasks: list[str], root: Path) -> list[dict[str, Any]]:
    """The perplexity skew of each row's coreset (paper 003, Fig. 4), where its selection measured
    one (P2D's run.json ``ppl``): base-model mean response NLL of the coreset vs the pool."""
    found: list[dict[str, Any]] = []
    for where, sel in _first_seed_selections(args, tasks, root):
        ppl = (read_stage(sel / "run.json") or {}).get("ppl")
        if not isinstance(ppl, dict) or ppl.get("skews_low") is None:
            continue
        found.append(
            {
                **where,
                "pool_nll": ppl["pool"]["mean_nll"],
                "coreset_nll": ppl["selected"]["mean_nll"],
                "delta": ppl["delta_mean_nll"],
                "skews_low": ppl["skews_low"],
            }
        )
    return found


def stage_times(out: Path) -> list[dict[str, Any]]:
    """Wall time of every finished stage under ``out``, from the stages' own files.

    One entry per stage kind and folder group: ``{"stage", "where", "n", "total_s", "mean_s"}``
    (pilot trainings, warmups, selections per method, trainings, evaluations (lm-eval and
    held-out parts apart)). Shared per-task coresets (``derived_from``) are not double-counted.
    """
    groups: dict[tuple[str, str], list[float]] = {}

    def add(stage: str, where: str, seconds: Any) -> None:
        if isinstance(seconds, (int, float)):
            groups.setdefault((stage, where), []).append(float(seconds))

    for path in sorted(out.rglob("run.json")):
        rel = path.relative_to(out).parts
        info = read_stage(path) or {}
        if "derived_from" in info or "checkpoint" in "".join(rel):
            continue
        t = info.get("timings") or {}
        if "select" in rel:
            method = rel[rel.index("select") + 1].split("-")[0]
            add(f"select {method}", "/".join(rel[: rel.index("select")]), t.get("total_s"))
        elif "train" in rel:
            kind = "pilot train" if rel[0] == "pilot" else "train"
            add(kind, "/".join(rel[: rel.index("train")]) or ".", t.get("train_s"))
    for path in sorted(out.rglob("warmup/info.json")):
        add("warmup", "/".join(path.relative_to(out).parts[:-2]) or ".", (read_stage(path) or {}).get("wall_s"))
    for path in sorted(out.rglob("eval.json")):
        rel = path.relative_to(out).parts
        t = (read_stage(path) or {}).get("timings") or {}
        where = "/".join(rel[: rel.index("eval") - (0 if rel[0] == "pilot" else 1)]) or "."
        add("eval lm-eval", where, t.get("eval_s"))
        add("eval held-out loss", where, t.get("heldout_s"))
    return [
        {"stage": stage, "where": where, "n": len(xs), "total_s": sum(xs), "mean_s": statistics.fmean(xs)}
        for (stage, where), xs in sorted(groups.items())
    ]


def write_all(
    args: ExperimentArgs,
    targets: dict[str, str],
    pools: dict[str, list[str]],
    t0: float,
    pilot: dict[str, Any] | None,
    full_sft: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tabulate what is on disk (every setting) into results.md / results.csv / experiment.json."""
    out = Path(args.out)
    tasks = list(targets)
    by_setting = {s: collect_results(args, tasks, setting_root(args, s)) for s in pools}
    comparisons = {s: paired_comparisons(args, tasks, setting_root(args, s)) for s in pools}
    skews = {s: ppl_skews(args, tasks, setting_root(args, s)) for s in pools}
    mixes = {s: coreset_mix(args, tasks, setting_root(args, s), pools[s]) for s in pools}
    agreement = {s: rank_agreement(args, tasks, setting_root(args, s)) for s in pools}
    info = {
        "command": "experiment",
        "settings": asdict(args),
        "pools": pools,
        "targets": targets,
        "versions": versions(),
        "hardware": hardware(),
        "wall_s": time.perf_counter() - t0,
        "full_sft": {k: v for k, v in (full_sft or {}).items() if k != "key"},
        "pilot": pilot,
        "rows": by_setting[next(iter(pools))] if len(pools) == 1 else None,
        "rows_by_setting": by_setting,
        "comparisons": comparisons,
        "stage_times": stage_times(out),
        "ppl_skews": skews,
        "coreset_mix": mixes,
        "rank_agreement": agreement,
    }
    write_results(out, args, tasks, by_setting, info, comparisons)
    write_json(out / "experiment.json", info)
    return info


def hardware() -> dict[str, Any]:
    """CPU / GPU description for the results."""
    import torch

    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


def _score(res: dict[str, Any] | None) -> float | None:
    """The headline metric of an ``eval.json`` in percent (``None``: not evaluated, or held-out loss only)."""
    if res is None or not res.get("task"):
        return None
    return 100.0 * float(res[res.get("metric") or metric_name(res)])


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population std (numpy's default ``ddof=0``; 0 for one seed)."""
    return statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0


def collect_results(args: ExperimentArgs, tasks: list[str], root: Path | None = None) -> list[dict[str, Any]]:
    """One row per Pretrained / Full-data / (method, budget) of one setting from the files on disk.

    ``root``: the setting's folder (default ``out``). Evaluations of lm-eval tasks give the
    score columns; ``heldout_only`` tasks have a loss column only and stay out of the average.
    """
    out = Path(args.out)
    root = out if root is None else root
    names = [task_label(t) for t in tasks]
    scored = [task_label(t) for t in tasks if t not in args.heldout_only]
    rows: list[dict[str, Any]] = []

    def row(
        label: str,
        method: str,
        budget: str,
        eval_dirs: dict[str, list[Path]],
        train_dirs: list[Path],
        select_dirs: list[list[Path]],
        extra_select_s: float = 0.0,
    ) -> dict[str, Any]:
        r: dict[str, Any] = {"row": label, "method": method, "budget": budget, "tasks": {}}
        for name in names:
            evals = [read_stage(d / "eval.json") for d in eval_dirs[name]]
            scores = [s for res in evals if (s := _score(res)) is not None]
            losses = [float(res["heldout"]["loss"]) for res in evals if res and res.get("heldout")]
            first = next((e for e in evals if e), {})
            r["tasks"][name] = {
                "scores": scores,
                "n_items": first.get("n"),
                "shots": first.get("shots"),
                "metric": first.get("metric"),
                "losses": losses,
                "n_heldout": (first.get("heldout") or {}).get("n"),
                **(dict(zip(("mean", "std"), _mean_std(scores))) if scores else {}),
                **(dict(zip(("loss_mean", "loss_std"), _mean_std(losses))) if losses else {}),
            }
        n_runs = max(len(v) for v in eval_dirs.values())
        complete = bool(scored) and all(len(r["tasks"][n]["scores"]) == n_runs for n in scored)
        r["average"] = statistics.fmean(r["tasks"][n]["mean"] for n in scored) if complete else None
        trained = [t for d in train_dirs if (t := read_stage(d / "run.json"))]
        times = [t["timings"]["train_s"] for t in trained]
        r["train_s"] = statistics.fmean(times) if times else None
        # tokens the model saw per epoch (after truncation): equal record budgets are not equal
        # token budgets when one method picks longer records
        tokens = [float(t["tokens"]) for t in trained if isinstance(t.get("tokens"), (int, float))]
        r["train_tokens"] = statistics.fmean(tokens) if tokens else None
        # summed over the selections of the row (one per task, or one joint); a selection
        # redrawn per seed counts as the mean of its draws
        per_owner = [
            [j["timings"]["total_s"] for d in draws if (j := read_stage(d / "run.json"))] for draws in select_dirs
        ]
        sel = [statistics.fmean(ts) for ts in per_owner if ts]
        r["select_s"] = sum(sel) + extra_select_s if sel else None
        r["n_runs"] = n_runs
        return r

    def evals(name: str) -> dict[str, list[Path]]:
        return {n: [root / n / "eval" / name.format(seed=s) for s in args.seeds] for n in names}

    if args.include_pretrained:
        pre = {n: [pretrained_dir(args, n)] for n in names}
        rows.append(row("Pretrained", "pretrained", "", pre, [], []))
    if args.include_full_data:
        fseeds = args.full_data_seeds or args.seeds
        label = "Full-data" if args.full_data_limit is None else f"Full-data ({args.full_data_limit} records)"
        rows.append(
            row(
                label,
                "full",
                "100%",
                {n: [root / n / "eval" / f"full-s{s}" for s in fseeds] for n in names},
                [root / "full" / "train" / f"full-s{s}" for s in fseeds],
                [],
            )
        )
    warm = read_stage(root / "warmup" / "info.json") or {}
    joint = args.coresets == "joint"
    for method in args.methods:
        plan = row_plan(method, args.variants)
        sel_method, name = plan.select, plan.label
        for budget in args.budgets:
            tag = budget_tag(budget)
            rn = f"{method}-{tag}"
            label = name if len(args.budgets) == 1 else f"{name} ({budget})"
            extra = float(warm.get("wall_s") or 0.0) if uses_warmup(method, args.variants) else 0.0
            for src, key in plan.extra_cost:  # e.g. P2D-double-dagger: locating H_T (the p2d selection's stage 1)
                extra += sum(
                    float(
                        ((read_stage(root / n / "select" / f"{src}-{tag}" / "run.json") or {}).get("stats") or {}).get(
                            key
                        )
                        or 0.0
                    )
                    for n in names
                )
            seeds = args.seeds if sel_method in args.reselect_per_seed else args.seeds[:1]
            owners: list[str | None] = [None] if joint else list(tasks)
            select_dirs = [[selection_dir(args, root, o, sel_method, budget, s) for s in seeds] for o in owners]
            train_dirs = (
                [root / "joint" / "train" / f"{rn}-s{s}" for s in args.seeds]
                if joint
                else [root / n / "train" / f"{rn}-s{s}" for n in names for s in args.seeds]
            )
            rows.append(row(label, method, budget, evals(rn + "-s{seed}"), train_dirs, select_dirs, extra))
    full_sft_s = (read_stage(out / "full_sft.json") or {}).get("full_sft_s")
    for r in rows:
        r["aer"] = _aer(r, 1 if joint else len(names), full_sft_s)
    return rows


def _aer(r: dict[str, Any], n_tasks: int, full_sft_s: float | None) -> float | None:
    """``(select_s / n_tasks + train_s) / full_sft_s`` of a fine-tuned row (Full-data: no selection)."""
    from coreselect.methods.p2d.train import alignment_efficiency_ratio

    sel = 0.0 if r["method"] == "full" else r["select_s"]
    if r["method"] == "pretrained" or not full_sft_s or r["train_s"] is None or sel is None:
        return None
    return alignment_efficiency_ratio(sel / max(n_tasks, 1), r["train_s"], full_sft_s)


def _per_item(dirs: list[Path], kind: str) -> list[dict[str, float]]:
    """Per-item values of each evaluation that exists (one dict per seed's folder): ``acc`` from
    lm-eval's samples files (keyed by ``doc_id``), ``loss`` from ``heldout.jsonl`` (keyed by record id)."""
    runs: list[dict[str, float]] = []
    for d in dirs:
        files = sorted(d.glob("samples_*.jsonl")) if kind == "acc" else [d / "heldout.jsonl"]
        files = [f for f in files if f.is_file()]
        if not files or not (d / "eval.json").is_file():
            continue
        vals: dict[str, float] = {}
        for f in files:
            for line in f.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                key, val = (f"{f.stem}:{rec['doc_id']}", rec.get("acc")) if kind == "acc" else (rec["id"], rec["loss"])
                if val is not None:
                    vals[key] = float(val)
        runs.append(vals)
    return runs


def paired_comparisons(args: ExperimentArgs, tasks: list[str], root: Path) -> list[dict[str, Any]]:
    """Paired bootstrap of ``bootstrap_reference`` against every other row, per task and metric.

    Each side contributes one row of per-item values per fine-tuning seed it has, and the
    bootstrap resamples the seeds as well as the items (:func:`coreselect.eval.bootstrap.paired_bootstrap`),
    so the interval holds the seed-to-seed spread too; only items every seed of both sides has
    are compared.
    """
    from coreselect.eval.bootstrap import paired_bootstrap

    ref = args.bootstrap_reference
    if not ref or ref not in args.methods:
        return []
    found: list[dict[str, Any]] = []
    for budget in args.budgets:
        tag = budget_tag(budget)
        others = [
            (row_plan(m, args.variants).label, [f"{m}-{tag}-s{s}" for s in args.seeds])
            for m in args.methods
            if m != ref
        ]
        if args.include_pretrained:
            others.insert(0, ("Pretrained", ["pretrained"]))
        for task in tasks:
            name = task_label(task)
            kinds = (["acc"] if task not in args.heldout_only else []) + (["loss"] if task in args.heldout else [])
            for kind in kinds:
                ref_runs = _per_item([root / name / "eval" / f"{ref}-{tag}-s{s}" for s in args.seeds], kind)
                if not ref_runs:
                    continue
                for label, runs in others:
                    dirs = (
                        [pretrained_dir(args, task)]
                        if runs == ["pretrained"]
                        else [root / name / "eval" / r for r in runs]
                    )
                    other_runs = _per_item(dirs, kind)
                    keys = sorted(set.intersection(*(set(r) for r in ref_runs + other_runs))) if other_runs else []
                    if not keys:
                        continue
                    res = paired_bootstrap(
                        [[r[k] for k in keys] for r in ref_runs],
                        [[r[k] for k in keys] for r in other_runs],
                        iters=args.bootstrap_iters,
                    )
                    found.append(
                        {
                            "reference": row_plan(ref, args.variants).label,
                            "row": label if len(args.budgets) == 1 else f"{label} ({budget})",
                            "task": name,
                            "metric": kind,
                            "n_seeds_ref": len(ref_runs),
                            "n_seeds_other": len(other_runs),
                            **res,
                        }
                    )
    return found
