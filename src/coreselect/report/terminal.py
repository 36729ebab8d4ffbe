"""``coreselect explain DIR --index N``: one pool record's tokens and their ``s_j`` in the terminal."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from coreselect.errors import ConfigError, CoreselectError
from coreselect.report.tokens import RecordView, is_template

RESET = "\x1b[0m"


@dataclass
class ExplainArgs:
    """Arguments of ``coreselect explain``.

    Attributes:
        dir: a TRIM selection run folder.
        index: pool index of the record to explain (0-based, as in scores.parquet).
        plain: print [token|0.83] instead of ANSI colors (automatic when stdout is not a terminal).
    """

    dir: str = ""
    index: int | None = None
    plain: bool = False


def _ansi_bg(s: float, lo: float, hi: float) -> str:
    """24-bit background: green, stronger towards ``hi`` (from ``max(lo, 0)``); red for negative ``s_j``."""
    if s < 0:
        full, t = (207, 34, 46), min(abs(s) / max(abs(lo), 1e-9), 1.0)
    else:
        base = max(lo, 0.0)
        full, t = (46, 160, 67), min(max((s - base) / max(hi - base, 1e-9), 0.0), 1.0)
    r, g, b = (round(255 + (y - 255) * (0.15 + 0.85 * t)) for y in full)
    return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m"


def render(view: RecordView, plain: bool) -> str:
    """The record's tokens: scored ones with their ``s_j`` (``~`` / underline: unseen-class backoff)."""
    tpl = is_template(view.codes)
    scored = view.s[view.in_m]
    lo, hi = (float(scored.min()), float(scored.max())) if scored.size else (0.0, 1.0)
    out = []
    for i, text in enumerate(view.tokens):
        if view.in_m[i]:
            s = float(view.s[i])
            if plain:
                mark = "" if view.direct[i] else "~"
                out.append(f"[{text.replace(chr(10), '↵')}|{s:.2f}{mark}]" + ("\n" if "\n" in text else ""))
            else:
                ul = "" if view.direct[i] else "\x1b[4m"
                out.append(f"{_ansi_bg(s, lo, hi)}{ul}{text}{RESET}")
        elif plain:
            out.append(text)
        else:
            out.append(f"\x1b[90m{text}{RESET}" if tpl[i] or text.strip() else text)
    return "".join(out)


def explain(args: ExplainArgs, stream: TextIO | None = None) -> RecordView:
    """Recompute and print the token-level view of pool record ``args.index``."""
    from coreselect.report.build import RunData
    from coreselect.report.tokens import Explainer, read_by_index

    stream = stream or sys.stdout
    if args.index is None or args.index < 0:
        raise ConfigError("give the pool record to explain with --index N")
    r = RunData.load(Path(args.dir))
    rows = [i for i, x in enumerate(r.index) if int(x) == args.index]
    if not rows:
        raise CoreselectError(f"--index {args.index}: no such pool record (the pool has {len(r.index)})")
    row = rows[0]
    ex = Explainer(args.dir)
    rec = read_by_index(ex.args.pool, [args.index]).get(args.index)
    if rec is None:
        raise CoreselectError(f"pool record index {args.index} not found: the pool changed since the run")
    view = ex.record_views([rec])[0]
    plain = args.plain or not stream.isatty()
    status = "selected" if r.selected[row] else "not selected"
    print(
        f"record {args.index} · id {rec.id} · source {rec.source} · rank {int(r.rank[row])}/{len(r.index)} "
        f"({status}, {r.k} selected)",
        file=stream,
    )
    legend = (
        "[token|s_j], ~ = unseen class scored via its nearest fingerprinted class"
        if plain
        else "background = s_j (darker green = higher, scaled to this record; red = negative), "
        "underline = unseen class backoff, grey = not scored"
    )
    print(f"({legend})\n", file=stream)
    print(render(view, plain), file=stream)
    print(
        f"\nmean {view.mean:.4f} · max {view.max:.4f} · coverage {view.coverage:.4f} · "
        f"score {view.score:.4f} (stored {float(r.score[row]):.4f}) · {view.n_scored}/{len(view.tokens)} "
        f"tokens scored, {int(view.oov.sum())} via backoff",
        file=stream,
    )
    return view
