"""``coreselect report DIR``: one self-contained ``report.html`` (+ the PNGs in ``report/``) for a run.

A *selection run* folder holds ``scores.parquet`` / ``coreset.jsonl`` / ``run.json`` (and
``fingerprints.safetensors`` for TRIM); a *compare* folder holds one such run per
sub-folder and no ``scores.parquet`` of its own.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from coreselect.errors import CoreselectError
from coreselect.io import atomic_path
from coreselect.methods import registry
from coreselect.report import html as H
from coreselect.report import plots
from coreselect.report.tokens import load_run, read_by_index

log = logging.getLogger("coreselect")

MAX_TARGETS = 20  # target examples shown token by token


@dataclass
class RunData:
    """A run folder's scores, as numpy columns in pool order."""

    name: str
    dir: Path
    run: dict[str, Any]
    index: np.ndarray
    ids: list[str]
    sources: list[str]
    n_tokens: np.ndarray
    score: np.ndarray
    rank: np.ndarray
    selected: np.ndarray
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # score_<name> of a multi-target run

    @classmethod
    def load(cls, run_dir: Path, name: str | None = None) -> RunData:
        import pyarrow.parquet as pq

        p = run_dir / "scores.parquet"
        if not p.is_file():
            raise CoreselectError(f"{run_dir}: no scores.parquet (not a finished selection run)")
        t = pq.read_table(p).sort_by("index")

        def col(c: str) -> np.ndarray:
            return t.column(c).to_numpy(zero_copy_only=False)

        return cls(
            name or run_dir.name,
            run_dir,
            load_run(run_dir),
            col("index"),
            t.column("id").to_pylist(),
            t.column("source").to_pylist(),
            col("n_tokens"),
            col("score").astype(np.float64),
            col("rank"),
            col("selected").astype(bool),
            {c.removeprefix("score_"): col(c).astype(np.float64) for c in t.column_names if c.startswith("score_")},
        )

    @property
    def k(self) -> int:
        return int(self.selected.sum())

    @property
    def method(self) -> str:
        return str(self.run.get("method") or self.run.get("settings", {}).get("method", "?"))

    def target_info(self) -> dict[str, Any] | None:
        """A multi-target run's ``names`` / ``combine`` / ``quota`` / ``sizes`` / ``coverage`` /
        ``overlap`` (run.json's ``targets``). When run.json lacks coverage and overlap they are
        computed from the ``score_<name>`` columns as ``select`` does (each target's own top-k:
        its quota share of the selected count under ``quota``, all of it otherwise).
        ``None`` for a single-target run."""
        info = dict(self.run.get("targets") or {})
        names = [n for n in info.get("names", []) if n in self.targets] or list(self.targets)
        if len(names) < 2:
            return None
        info["names"] = names
        if not info.get("coverage") or not isinstance(info.get("overlap"), dict):
            from coreselect.combine import coverage_report, parse_quota, quota_counts

            per = {n: self.targets[n] for n in names}
            how = info.setdefault("combine", "quota")
            top_k = dict.fromkeys(names, self.k)
            if how == "quota":
                with contextlib.suppress(CoreselectError):  # shares of other names: the whole budget
                    top_k = quota_counts(self.k, parse_quota(info.get("quota") or None, names))
            info.update(coverage_report(per, np.flatnonzero(self.selected), top_k))
        return info

    def target_top(self, name: str, k: int) -> np.ndarray:
        """Row positions of target ``name``'s own top ``k`` (its score descending, ties by pool position)."""
        from coreselect.combine import target_order

        return target_order(self.targets[name])[:k]

    def by_rank(self, first: int, n: int) -> list[int]:
        """Row positions of ranks ``first .. first + n - 1`` (1-based)."""
        order = np.argsort(self.rank, kind="stable")
        return [int(i) for i in order[first - 1 : first - 1 + n]]

    def cut(self) -> float | None:
        """A score between the last selected record and the first one left out."""
        s = np.sort(self.score)[::-1]
        if self.k == 0 or self.k > len(s):
            return None
        if self.k == len(s) or not np.isfinite(s[self.k]):
            return float(s[self.k - 1])
        return float((s[self.k - 1] + s[self.k]) / 2)

    def lengths(self, cache: dict[tuple[str, ...], np.ndarray]) -> tuple[np.ndarray, str]:
        """Per-record lengths: model tokens when the method counted them, else whitespace words."""
        if self.n_tokens.any():
            return self.n_tokens.astype(np.int64), "tokens"
        pool = tuple(self.run.get("settings", {}).get("pool", []))
        if pool not in cache:
            from coreselect.data.readers import pool_records

            words = {r.index: sum(len(m.content.split()) for m in r.messages) for r in pool_records(list(pool))}
            cache[pool] = np.array([words.get(int(i), 0) for i in self.index], dtype=np.int64)
        return cache[pool], "words"


@dataclass
class ReportArgs:
    """Arguments of ``coreselect report``.

    Attributes:
        dir: a selection run folder, or a ``compare`` folder of run folders.
        top: top selected records shown token by token.
        below: records just below the budget's cut shown token by token.
        out: the HTML file to write (default: DIR/report.html; PNGs go to report/ beside it).
        progress: show progress bars.
    """

    dir: str = ""
    top: int = 20
    below: int = 5
    out: str | None = None
    progress: bool = True


def is_compare_dir(d: Path) -> bool:
    """A compare folder: sub-folders holding run.json and no scores.parquet at the top."""
    return not (d / "scores.parquet").exists() and any((s / "run.json").is_file() for s in d.iterdir() if s.is_dir())


class _Images:
    """Writes each figure to ``report/NAME.png`` and returns its data URI."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, png: bytes, alt: str) -> str:
        with atomic_path(self.folder / f"{name}.png") as tmp:
            tmp.write_bytes(png)
        return H.figure(plots.data_uri(png), alt)


def _summary(r: RunData) -> str:
    st = r.run.get("settings", {})
    rows: list[tuple[str, object]] = [
        ("method", r.method),
        ("pool records", len(r.index)),
        ("selected", f"{r.k} (budget {st.get('budget', '?')})"),
    ]
    multi = r.target_info()
    if multi:
        rows.append(("targets", f"{', '.join(multi['names'])} (combine: {multi.get('combine', '?')})"))
    if r.method in registry.names():  # the method's own rows (TRIM: its knobs)
        rows += registry.get(r.method).cls.report_summary(r.run)
    total = (r.run.get("timings") or {}).get("total_s")
    if total is not None:
        rows.append(("selection wall time", f"{total:.1f} s"))
    return H.table(["setting", "value"], [(k, "" if v is None else str(v)) for k, v in rows])


def _targets_section(r: RunData, info: dict[str, Any], img: _Images) -> str:
    """Several targets: each one's coverage (coreset records in its own top-k), the overlap of
    those top-k sets, and the source mix of each top-k next to the combined coreset's."""
    names: list[str] = info["names"]
    cov: dict[str, dict[str, int]] = info["coverage"]
    shares = info.get("quota") or {}
    sizes = info.get("sizes") or {}
    rows = []
    for n in names:
        k, hit = int(cov[n]["k"]), int(cov[n]["in_coreset"])
        share = f"{100 * float(shares[n]):.1f}%" if n in shares else "-"
        rows.append((n, sizes.get(n, "-"), share, k, hit, f"{hit}/{k} ({100 * hit / max(k, 1):.0f}%)"))
    how = info.get("combine", "?")
    body = (
        f'<p class="note">{len(names)} targets combined by <b>{escape(str(how))}</b> into one coreset of '
        f"{r.k}. A target's own top-k is its ranking alone (<code>score_&lt;name&gt;</code> in "
        "scores.parquet), with k its quota share of the budget under <code>--combine quota</code> and "
        "the whole budget otherwise; coverage counts the coreset records among them.</p>"
    )
    body += H.table(["target", "target records", "quota", "own top-k", "in coreset", "coverage"], rows)
    overlap = info.get("overlap") or {}

    def shared(a: str, b: str) -> object:
        if a == b:
            return int(cov[a]["k"])
        v = overlap.get(f"{a}|{b}", overlap.get(f"{b}|{a}"))
        return "-" if v is None else int(v)

    body += (
        '<p class="note">Overlap: records that two targets\' own top-k sets share (diagonal: k). '
        "A record wanted by two targets counts once in the coreset.</p>"
    )
    body += H.table(["", *names], [(a, *[shared(a, b) for b in names]) for a in names])
    groups = [("coreset (combined)", r.sources, [s for s, x in zip(r.sources, r.selected) if x])]
    for n in names:
        top = r.target_top(n, int(cov[n]["k"]))
        groups.append((f"{n}: own top-{len(top)}", r.sources, [r.sources[int(i)] for i in top]))
    return body + img("target-mix", plots.source_mix(groups), "source mix of each target's own top-k")


def _distribution_sections(r: RunData, img: _Images) -> list[tuple[str, str, str]]:
    out = []
    cut = r.cut()
    hist = img("score-histogram", plots.score_histogram(r.score, cut, r.k), "score histogram")
    out.append(("score-histogram", "Score distribution and the budget's cut", hist))
    src = img(
        "source-mix",
        plots.source_mix([(r.name, r.sources, [s for s, x in zip(r.sources, r.selected) if x])]),
        "source mix",
    )
    out.append(("source-mix", "Source mix: coreset vs pool", src))
    try:
        lengths, unit = r.lengths({})
        ln = img("length-dist", plots.length_dist([(r.name, lengths, lengths[r.selected], unit)]), "lengths")
    except CoreselectError as e:
        ln = f'<p class="warn">lengths unavailable: {escape(str(e))}</p>'
    out.append(("length-dist", "Length distribution: coreset vs pool", ln))
    return out


def _token_sections(r: RunData, args: ReportArgs) -> list[tuple[str, str, str]]:
    """Target saliency, fingerprint classes, top and below-cut records (recomputed with the run's model)."""
    from coreselect.progress import progress_bar
    from coreselect.report.tokens import Explainer
    from coreselect.runtime import read_target

    ex = Explainer(r.dir)
    settings = ex.args
    out = []
    targets = read_target(settings)
    if targets:
        target_views = ex.target_views(targets[:MAX_TARGETS])
        more = f" (first {MAX_TARGETS} of {len(targets)})" if len(targets) > MAX_TARGETS else ""
        body = (
            f'<p class="note">Background: saliency of each token in Stage I{escape(more)}. Toggle '
            '<button class="btn" data-mode="q">row Q</button> <button class="btn" data-mode="k">column K</button> '
            '<button class="btn" data-mode="a">combined α</button>; grey text: template / out-of-scope tokens '
            "(not fingerprinted).</p>"
        )
        body += "".join(H.target_block(v) for v in target_views)
    else:
        body = '<p class="note">The run reused saved fingerprints; no target examples recorded.</p>'
    out.append(("target-saliency", "Target examples: token saliency (Stage I)", body))
    classes = ex.top_classes(25)
    out.append(
        (
            "fingerprint-classes",
            "Token classes carrying the most fingerprint weight",
            f'<p class="note">{len(ex.fingerprints)} token classes in the fingerprints.</p>'
            + H.table(["token", "count", "total weight"], [(H.visible(t), c, w) for t, c, w in classes]),
        )
    )

    top_rows = r.by_rank(1, min(args.top, r.k))
    below_rows = r.by_rank(r.k + 1, args.below)
    want = [int(r.index[i]) for i in top_rows + below_rows]
    records = read_by_index(settings.pool, want)
    missing = [i for i in want if i not in records]
    if missing:
        raise CoreselectError(f"pool record index {missing[0]} not found: the pool changed since the run")
    with progress_bar(len(want), "report: scoring shown records", enabled=args.progress) as bar:
        views = dict(zip(want, ex.record_views([records[i] for i in want], bar)))
    lam = ex.config.oov_penalty
    scored = np.concatenate([v.s[v.in_m] for v in views.values()] + [np.zeros(0)])
    scale = (float(scored.min()), float(scored.max())) if scored.size else (0.0, 1.0)

    def blocks(rows: list[int]) -> str:
        if not rows:
            return '<p class="note">none</p>'
        return H.score_legend(*scale) + "".join(
            H.record_block(views[int(r.index[i])], int(r.rank[i]), float(r.score[i]), bool(r.selected[i]), lam, scale)
            for i in rows
        )

    out.append(("top-records", f"Top {len(top_rows)} selected records (Stage II)", blocks(top_rows)))
    out.append(("below-cut", f"{len(below_rows)} records just below the cut", blocks(below_rows)))
    return out


def _single(d: Path, args: ReportArgs, img: _Images) -> str:
    r = RunData.load(d)
    sections = [("run-summary", "Run", _summary(r))]
    if (d / "fingerprints.safetensors").is_file():
        try:
            tok = _token_sections(r, args)
        except CoreselectError as e:
            tok = [
                ("token-views", "Token-level views", f'<p class="warn">token-level views skipped: {escape(str(e))}</p>')
            ]
        sections += tok[:2] + _distribution_sections(r, img) + tok[2:]
    else:
        why = (
            "has one fingerprint dictionary per target (<code>fingerprints-&lt;name&gt;.safetensors</code>); "
            "token-level views need a single-target run"
            if any(d.glob("fingerprints-*.safetensors"))
            else "keeps no token fingerprints"
        )
        sections[0] = (
            "run-summary",
            "Run",
            _summary(r) + f'<p class="note">{escape(r.method)} {why}, so only the distribution panels are shown.</p>',
        )
        sections += _distribution_sections(r, img)
    multi = r.target_info()
    if multi:
        sections.insert(1, ("targets", "Targets: coverage and overlap", _targets_section(r, multi, img)))
    if r.method in registry.names():  # the method's own figures, after the summary (P2D: its heads)
        for i, f in enumerate(registry.get(r.method).cls.report_figures(d, r.run), start=1):
            note = f'<p class="note">{escape(f.note)}</p>' if f.note else ""
            sections.insert(i, (f.key, f.title, note + img(f.key, f.png, f.alt)))
    sub = f"{r.method} · selected {r.k} of {len(r.index)} pool records · {d}"
    return H.page(f"coreselect report: {r.name}", sub, sections)


def _compare(d: Path, img: _Images) -> str:
    runs = [
        RunData.load(s, s.name)
        for s in sorted(d.iterdir())
        if s.is_dir() and (s / "scores.parquet").is_file() and (s / "run.json").is_file()
    ]
    if not runs:
        raise CoreselectError(f"{d}: no finished run in its sub-folders")
    summary = H.table(
        ["run", "method", "pool", "selected", "wall time (s)"],
        [(r.name, r.method, len(r.index), r.k, float((r.run.get("timings") or {}).get("total_s", 0.0))) for r in runs],
    )
    cache: dict[tuple[str, ...], np.ndarray] = {}
    src = img(
        "source-mix",
        plots.source_mix(
            [(f"{r.name} ({r.method})", r.sources, [s for s, x in zip(r.sources, r.selected) if x]) for r in runs]
        ),
        "source mix per method",
    )
    panels = []
    for r in runs:
        lengths, unit = r.lengths(cache)
        panels.append((f"{r.name} ({r.method})", lengths, lengths[r.selected], unit))
    ln = img("length-dist", plots.length_dist(panels), "lengths per method")
    sets = [set(r.index[r.selected].tolist()) for r in runs]
    m = np.array([[len(a & b) / max(len(a | b), 1) for b in sets] for a in sets])
    names = [r.name for r in runs]
    jac = img("jaccard", plots.jaccard_matrix(names, m), "Jaccard overlap")
    jac += H.table(["", *names], [(n, *[float(x) for x in row]) for n, row in zip(names, m)])
    sections = [
        ("run-summary", "Runs", summary),
        ("source-mix", "Source mix per method", src),
        ("length-dist", "Length distribution per method", ln),
        ("jaccard", "Coreset overlap (Jaccard)", jac),
    ]
    per_target = _compare_targets(runs)
    if per_target:
        sections.append(("targets", "Per target: coverage, overlap and rank correlation", per_target))
    return H.page(f"coreselect compare report: {d.name}", f"{len(runs)} methods · {d}", sections)


def _compare_targets(runs: list[RunData]) -> str:
    """Runs with several named targets: :func:`coreselect.compare.target_comparison` as tables."""
    import pyarrow.parquet as pq

    from coreselect.compare import target_comparison

    names = [r.name for r in runs]
    per = target_comparison(
        {r.name: pq.read_table(r.dir / "scores.parquet") for r in runs}, {r.name: r.run for r in runs}
    )
    if not per:
        return ""
    targets = list(per)

    def cov(t: str, n: str) -> str:
        c, k = per[t]["coverage"].get(n), per[t]["k"].get(n)
        return "-" if c is None else f"{c}/{k}"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    body = (
        '<p class="note">Coverage: coreset records in the target\'s own top-k (its ranking alone, '
        "<code>score_&lt;name&gt;</code>); -: the run has no such column.</p>"
    )
    body += H.table(["run", *targets], [(n, *[cov(t, n) for t in targets]) for n in names])
    for t in targets:
        body += f'<p class="note"><b>{escape(t)}</b>: Jaccard of the runs\' own top-k / Spearman of their rankings</p>'
        rows = [
            (a, *[f"{num(per[t]['jaccard'][a][b])} / {num(per[t]['spearman'][a][b])}" for b in names]) for a in names
        ]
        body += H.table(["", *names], rows)
    return body


def report(args: ReportArgs) -> Path:
    """Write the report and return the HTML file's path."""
    d = Path(args.dir)
    if not args.dir or not d.is_dir():
        raise CoreselectError(f"{args.dir or '(none)'}: no such run folder")
    if args.top < 0 or args.below < 0:
        raise CoreselectError("--top and --below must be >= 0")
    out = Path(args.out) if args.out else d / "report.html"
    img = _Images(out.parent / "report")
    doc = _compare(d, img) if is_compare_dir(d) else _single(d, args, img)
    with atomic_path(out) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return out
