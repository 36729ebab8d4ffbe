"""``coreselect compare``: several methods on the same pool, target and budget, side by side.

One warmup is trained (or reused) and shared by every model-based method. Each method's
run lands in ``DIR/<method>/`` (the usual coreset.jsonl / scores.parquet / run.json), and
``DIR/comparison.md`` / ``comparison.csv`` hold, per method: selection wall time, forward
and backward passes, peak memory, the coreset's source mix, mean / median token length of
the coreset vs the pool (the paper's length-bias analysis, Fig. 3) with the Spearman
correlation of the method's score with that length (:func:`length_bias`), and the pairwise
Jaccard overlap of the coresets; ``source_mix.png`` and ``lengths.png`` plot them. When a
method's run.json carries an ``aer`` (P2D's estimated Alignment Efficiency Ratio), an
``aer`` column is added, blank for the methods without one (no cost is estimated for them).

Several named targets (``--target csqa=a.jsonl siqa=b.jsonl``): every method's run carries a
``score_<name>`` column per target, and the comparison adds, per target, each method's
coverage (coreset records in that target's own top-k, from its run.json; a ``cov:<name>``
column of comparison.csv) and, between every two methods that both have ``score_<name>``,
the Jaccard overlap of their own top-k sets for that target and the Spearman correlation of
their ``score_<name>`` rankings (:func:`target_comparison`; also in ``run.json`` as
``targets``).
"""

from __future__ import annotations

import collections
import csv
import io
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coreselect.config import SelectArgs, accepts_method_options, known_methods
from coreselect.errors import ConfigError
from coreselect.io import atomic_path, write_json
from coreselect.methods import registry


@accepts_method_options
@dataclass
class CompareArgs(SelectArgs):
    """Arguments of ``coreselect compare``: those of ``select`` plus the method list.

    Method options follow ``select``'s rule (:mod:`coreselect.config`): a flat key goes to
    every compared method that has it; ``options: {bm25: {k1: 1.2}}`` to one method only.

    Attributes:
        methods: comma-separated methods to compare, e.g. ``trim,random,bm25,dsir``.
    """

    methods: str = "trim,random,bm25,dsir"

    def method_list(self) -> list[str]:
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not names:
            raise ConfigError("--methods is empty")
        unknown = [m for m in names if m not in known_methods()]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(known_methods())})")
        if len(set(names)) != len(names):
            raise ConfigError("--methods lists a method twice")
        flat = {k for k in self.options if k not in known_methods()}
        unused = sorted(flat - {o for m in names for o in registry.get(m).option_names()})
        if unused:
            raise ConfigError(f"option(s) {', '.join(unused)} belong to none of {', '.join(names)}")
        return names


def compare(args: CompareArgs) -> dict[str, Any]:
    """Run every method of ``args.methods`` and write the comparison files."""
    from coreselect.pipeline import select
    from coreselect.runtime import scan_pool, warmup_model
    from coreselect.selection import check_out_dir

    methods = args.method_list()
    out = Path(args.out)
    args.method = methods[0]
    per_method = {m: args.method_options(m, strict=False) for m in methods}
    given, args.options = args.options, per_method[methods[0]]  # validate() checks the first method's
    args.validate()
    args.options = given
    check_out_dir(out, overwrite=args.overwrite, resume=args.resume)
    out.mkdir(parents=True, exist_ok=True)

    shared_warmup = args.warmup
    warm_info: dict[str, Any] = {"mode": args.warmup}
    if args.warmup == "auto" and any(registry.get(m).needs_model for m in methods):
        n_pool, _ = scan_pool(args)
        t0 = time.perf_counter()
        adapter, warm_info = warmup_model(args, out, n_pool)
        warm_info["wall_s"] = warm_info.get("wall_s", time.perf_counter() - t0)
        shared_warmup = adapter or "none"

    runs: dict[str, dict[str, Any]] = {}
    for name in methods:
        sub = out / name
        if args.resume and (sub / "run.json").exists() and (sub / "coreset.jsonl").exists():
            runs[name] = json.loads((sub / "run.json").read_text())
            continue
        margs = replace(args, method=name, out=str(sub), warmup=shared_warmup, options=per_method[name])
        own = {k: v for k, v in asdict(margs).items() if k in SelectArgs.__dataclass_fields__}
        runs[name] = select(SelectArgs(**own))

    per_target: dict[str, dict[str, Any]] = {}
    table = summarize(out, methods, runs, args, per_target)
    info: dict[str, Any] = {
        "command": "compare",
        "methods": methods,
        "warmup": warm_info,
        "settings": asdict(args),
        "summary": table,
    }
    if per_target:
        info["targets"] = per_target
    write_json(out / "run.json", info)
    return {"methods": methods, "summary": table, "warmup": warm_info}


def _pool_lengths(args: SelectArgs, tables: dict[str, pa.Table]) -> dict[int, int]:
    """Token length of every pool record under the model's template (for the length analysis).

    A token-level method already stored it in its scores (``n_tokens``, same Formatter, > 0 for
    every record); the pool is read and tokenized again only when no compared method tokenizes.
    """
    for t in tables.values():
        n_tokens = t.column("n_tokens").to_numpy()
        if len(n_tokens) and (n_tokens > 0).all():
            return dict(zip(t.column("index").to_pylist(), n_tokens.tolist()))
    from coreselect.data.formatting import Formatter
    from coreselect.models.loading import load_tokenizer, resolve_model
    from coreselect.runtime import iter_pool

    tok = load_tokenizer(resolve_model(args.model), args.trust_remote_code)
    fmt = Formatter(tok, args.max_length, args.template, template_date=args.template_date)
    return {r.index: len(fmt.encode(r)) for r in iter_pool(args)}


def summarize(
    out: Path,
    methods: list[str],
    runs: dict[str, dict[str, Any]],
    args: SelectArgs,
    per_target: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Write comparison.md / comparison.csv / PNGs; return the per-method rows. Several named
    targets: :func:`target_comparison`'s result goes into ``per_target`` when given."""
    tables = {m: pq.read_table(out / m / "scores.parquet") for m in methods}
    first = tables[methods[0]]
    sources = first.column("source").to_pylist()
    index = first.column("index").to_numpy()
    lengths = _pool_lengths(args, tables)
    pool_len = np.array([lengths[int(i)] for i in index])
    pool_mix = collections.Counter(sources)
    src_of = dict(zip(index.tolist(), sources))
    chosen = {m: set(t.filter(t.column("selected")).column("index").to_pylist()) for m, t in tables.items()}
    aers = {m: _aer(runs[m]) for m in methods}
    has_aer = any("aer" in runs[m] for m in methods)
    sel_lens = {m: np.array([lengths[i] for i in sorted(chosen[m])], dtype=np.int64) for m in methods}
    rows = []
    for m in methods:
        cost = runs[m].get("cost", {})
        sel = np.array(sorted(chosen[m]))
        sel_len = sel_lens[m]
        mix = collections.Counter(src_of[int(i)] for i in sel)
        rows.append(
            {
                "method": m,
                "selected": len(sel),
                "wall_s": round(float(runs[m].get("timings", {}).get("total_s", 0.0)), 3),
                "forward_passes": int(cost.get("forward_passes", 0)),
                "backward_passes": int(cost.get("backward_passes", 0)),
                "peak_memory_mb": round(float(cost.get("peak_memory_mb", 0.0)), 1),
                **({"aer": None if (aer := aers[m]) is None else round(aer, 4)} if has_aer else {}),
                "mean_len": round(float(sel_len.mean()), 1) if len(sel_len) else 0.0,
                "length_rho": None if (rho := _score_length_rho(tables[m], lengths)) is None else round(rho, 4),
                "median_len": float(np.median(sel_len)) if len(sel_len) else 0.0,
                "pool_mean_len": round(float(pool_len.mean()), 1),
                "pool_median_len": float(np.median(pool_len)),
                **{f"mix:{s}": round(100 * mix.get(s, 0) / max(len(sel), 1), 1) for s in sorted(pool_mix)},
            }
        )
    overlap = {a: {b: jaccard(chosen[a], chosen[b]) for b in methods} for a in methods}
    targets = target_comparison(tables, runs)
    if per_target is not None:
        per_target.update(targets)
    for r in rows:
        for name, t in targets.items():
            r[f"cov:{name}"] = t["coverage"][r["method"]]
    _write_csv(out / "comparison.csv", rows)
    _write_md(out / "comparison.md", rows, overlap, pool_mix, args, targets)
    _plots(out, methods, rows, pool_mix, sel_lens, pool_len)
    return rows


def _score_length_rho(table: pa.Table, lengths: dict[int, int]) -> float | None:
    """:func:`length_bias` of one method's ``score`` column against the pool's token lengths."""
    index = table.column("index").to_pylist()
    return length_bias(table.column("score").to_numpy(), np.array([lengths[int(i)] for i in index]))


def target_names(tables: dict[str, pa.Table], runs: dict[str, dict[str, Any]]) -> list[str]:
    """Targets with a ``score_<name>`` column in at least one run, in the runs' ``--target`` order."""
    names: list[str] = []
    for m, t in tables.items():
        listed = (runs.get(m, {}).get("targets") or {}).get("names") or []
        cols = [c.removeprefix("score_") for c in t.column_names if c.startswith("score_")]
        for n in [*listed, *cols]:
            if n in cols and n not in names:
                names.append(n)
    return names


def target_comparison(tables: dict[str, pa.Table], runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target, how the methods' own rankings for it compare (empty for single-target runs).

    For each target ``name`` that some run scored (``score_<name>``), ``{"k", "coverage",
    "jaccard", "spearman"}``: ``k`` is the size of a method's own top-k for the target (its
    run.json coverage ``k``: the target's quota share of the budget under ``--combine quota``,
    else the budget); ``coverage[m]`` is how many of method ``m``'s coreset records sit in that
    top-k (run.json's, else counted here); ``jaccard[a][b]`` is the overlap of the two methods'
    top-k sets and ``spearman[a][b]`` the correlation of their rankings by ``score_<name>``.
    A method without the column gets ``None`` everywhere; so does ``spearman`` on < 2 records.
    """
    from coreselect.combine import target_order

    names = target_names(tables, runs)
    if len(names) < 2:
        return {}
    methods = list(tables)
    by_index = {m: t.sort_by("index") for m, t in tables.items()}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        tops: dict[str, set[int]] = {}
        ranks: dict[str, np.ndarray] = {}
        coverage: dict[str, int | None] = {}
        ks: dict[str, int] = {}
        for m in methods:
            t = by_index[m]
            if f"score_{name}" not in t.column_names:
                coverage[m] = None
                continue
            index = t.column("index").to_numpy()
            scores = t.column(f"score_{name}").to_numpy()
            order = target_order(scores)
            cov = ((runs.get(m, {}).get("targets") or {}).get("coverage") or {}).get(name) or {}
            selected = t.column("selected").to_numpy(zero_copy_only=False).astype(bool)
            k = int(cov.get("k", int(selected.sum())))
            top = {int(i) for i in index[order[:k]]}
            tops[m], ks[m] = top, k
            rank = np.empty(len(order), dtype=np.float64)
            rank[order] = np.arange(len(order))
            ranks[m] = rank
            in_core = cov.get("in_coreset")
            coverage[m] = int(in_core) if in_core is not None else len(top & {int(i) for i in index[selected]})

        pairs = {a: {b: _pair(tops, ranks, a, b) for b in methods} for a in methods}
        out[name] = {
            "k": {m: ks.get(m) for m in methods},
            "coverage": coverage,
            "jaccard": {a: {b: pairs[a][b][0] for b in methods} for a in methods},
            "spearman": {a: {b: pairs[a][b][1] for b in methods} for a in methods},
        }
    return out


def _pair(tops: dict[str, set[int]], ranks: dict[str, np.ndarray], a: str, b: str) -> tuple[float | None, float | None]:
    """Jaccard of two methods' top-k sets and Spearman of their rankings (``None`` when one lacks the target)."""
    if a not in tops or b not in tops:
        return None, None
    ra, rb = ranks[a], ranks[b]
    rho = float(np.corrcoef(ra, rb)[0, 1]) if len(ra) > 1 and len(ra) == len(rb) else None
    return round(jaccard(tops[a], tops[b]), 4), None if rho is None else round(rho, 4)


def _aer(run: dict[str, Any]) -> float | None:
    """The AER in a run.json (``{"aer": {"aer": x, ...}}`` as P2D writes it, or a bare number)."""
    v = run.get("aer")
    v = v.get("aer") if isinstance(v, dict) else v
    return float(v) if isinstance(v, (int, float)) else None


def length_bias(scores: np.ndarray, lengths: np.ndarray) -> float | None:
    """Spearman's rho between a method's scores and the records' lengths (ties: average ranks).

    +1: the longest records score highest; -1: the shortest do (a short-record bias, what the
    paper's Fig. 3 length analysis looks for). Records with a non-finite score (unscorable,
    ``-inf``) are left out; None when fewer than two records remain or either side is constant.
    """
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    n = np.asarray(lengths, dtype=np.float64)
    ok = np.isfinite(s)
    s, n = s[ok], n[ok]
    if len(s) < 2 or np.ptp(s) == 0 or np.ptp(n) == 0:
        return None
    return float(np.corrcoef(rankdata(s), rankdata(n))[0, 1])


def jaccard(a: set[int], b: set[int]) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _write_md(
    path: Path,
    rows: list[dict[str, Any]],
    overlap: dict[str, dict[str, float]],
    pool_mix: collections.Counter,
    args: SelectArgs,
    per_target: dict[str, dict[str, Any]] | None = None,
) -> None:
    n_pool = sum(pool_mix.values())
    srcs = sorted(pool_mix)
    has_aer = "aer" in rows[0]
    lines = [
        f"# Comparison: budget {args.budget} of {n_pool} records, model `{args.model}`",
        "",
        "| method | wall s | fwd | bwd | peak MB | mean len | median len | ρ(score, len) |"
        + (" AER |" if has_aer else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if has_aer else ""),
    ]
    for r in rows:
        aer = (f" {r['aer']:.3f} |" if r["aer"] is not None else " |") if has_aer else ""
        lines.append(
            f"| {r['method']} | {r['wall_s']:.1f} | {r['forward_passes']} | {r['backward_passes']} | "
            f"{r['peak_memory_mb']:.0f} | {r['mean_len']:.1f} | {r['median_len']:.0f} | "
            + ("–" if r["length_rho"] is None else f"{r['length_rho']:+.2f}")
            + " |"
            + aer
        )
    lines.append(
        f"| *pool* | | | | | {rows[0]['pool_mean_len']:.1f} | {rows[0]['pool_median_len']:.0f} | |"
        + (" |" if has_aer else "")
    )
    lines += [
        "",
        "Lengths are tokens under the model's template; ρ(score, len) is Spearman's rank correlation of the "
        "method's score with that length over the scored pool (negative: short records rank high).",
    ]
    if has_aer:
        lines += [
            "",
            (
                "AER (lower is better): the method's own estimate in its run.json, (selection + training) / "
                "full-data full-parameter SFT time; P2D estimates it for heads-only training of its coreset "
                "(coreselect.methods.p2d.train.estimate_aer). Blank: the method reports none."
            ),
        ]
    lines += [
        "",
        "## Source mix (% of the coreset)",
        "",
        "| method | " + " | ".join(srcs) + " |",
        "| --- |" + " ---: |" * len(srcs),
    ]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(f"{r['mix:' + s]:.1f}" for s in srcs) + " |")
    lines.append("| *pool* | " + " | ".join(f"{100 * pool_mix[s] / n_pool:.1f}" for s in srcs) + " |")
    names = [r["method"] for r in rows]
    lines += ["", "## Overlap (Jaccard)", "", "| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(f"{overlap[a][b]:.2f}" for b in names) + " |")
    lines += _target_md(per_target or {}, names)
    lines += ["", "Plots: source_mix.png, lengths.png"]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _target_md(per_target: dict[str, dict[str, Any]], methods: list[str]) -> list[str]:
    """comparison.md's per-target section (several named targets)."""
    if not per_target:
        return []

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    targets = list(per_target)
    lines = [
        "",
        "## Per target",
        "",
        "Coverage: coreset records in the target's own top-k (its ranking alone, `score_<name>`; k = its",
        "quota share of the budget under `--combine quota`, else the budget). `-`: the run has no such column.",
        "",
        "| method | " + " | ".join(targets) + " |",
        "| --- |" + " ---: |" * len(targets),
    ]
    for m in methods:
        cells = []
        for name in targets:
            c, k = per_target[name]["coverage"].get(m), per_target[name]["k"].get(m)
            cells.append("-" if c is None else f"{c}/{k}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for name in targets:
        t = per_target[name]
        lines += [
            "",
            f"### {name}: own top-k overlap (Jaccard) / rank correlation (Spearman)",
            "",
            "| | " + " | ".join(methods) + " |",
            "| --- |" + " ---: |" * len(methods),
        ]
        for a in methods:
            cells = [f"{num(t['jaccard'][a][b])} / {num(t['spearman'][a][b])}" for b in methods]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def _plots(
    out: Path,
    methods: list[str],
    rows: list[dict[str, Any]],
    pool_mix: collections.Counter,
    sel_lens: dict[str, np.ndarray],
    pool_len: np.ndarray,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srcs = sorted(pool_mix)
    n_pool = sum(pool_mix.values())
    labels = ["pool", *methods]
    shares = [[100 * pool_mix[s] / n_pool for s in srcs]] + [[r["mix:" + s] for s in srcs] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 4))
    bottom = np.zeros(len(labels))
    for j, s in enumerate(srcs):
        vals = np.array([sh[j] for sh in shares])
        ax.bar(labels, vals, bottom=bottom, label=s)
        bottom += vals
    ax.set_ylabel("% of records")
    ax.set_title("Source mix")
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "source_mix.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    data = [pool_len] + [sel_lens[m] for m in methods]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30)
    ax.set_ylabel("tokens per record")
    ax.set_title("Token length: coreset vs pool")
    fig.tight_layout()
    with atomic_path(out / "lengths.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
