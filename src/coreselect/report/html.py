"""HTML building blocks of the report: one self-contained page, inline CSS and JS, all text escaped."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import numpy as np

from coreselect.report.tokens import RecordView, TargetView, is_template

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2328;background:#fff}
header{background:#1f2328;color:#fff;padding:14px 28px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9d1d9}nav{padding:8px 28px;background:#f6f8fa;border-bottom:1px solid #d0d7de}
nav a{margin-right:14px;color:#0969da;text-decoration:none}main{padding:8px 28px 40px;max-width:1200px}
section{margin:22px 0}h2{font-size:17px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#57606a;font-size:13px}.warn{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px}
.rec{border:1px solid #d0d7de;border-radius:6px;margin:10px 0;overflow:hidden}
.rec .meta{background:#f6f8fa;padding:5px 10px;font-size:13px;border-bottom:1px solid #d0d7de}
.toks{font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
word-break:break-word;padding:8px 10px;max-height:420px;overflow:auto}
.toks span{border-radius:2px}.tpl{color:#8c959f}.uns{color:#8c959f}
.oov{text-decoration:underline dotted #0550ae 2px;text-underline-offset:3px}
.legend{display:inline-block;width:160px;height:10px;vertical-align:middle;border:1px solid #d0d7de}
.btn{border:1px solid #d0d7de;background:#f6f8fa;border-radius:4px;padding:2px 10px;cursor:pointer;font:inherit}
.btn.on{background:#fd8c00;color:#fff;border-color:#fd8c00}img{max-width:100%}
"""

JS = """
function salColor(v){return 'rgba(253,140,0,'+(0.05+0.85*Math.max(0,Math.min(1,v))).toFixed(3)+')';}
function setMode(mode){
  document.querySelectorAll('#target-saliency span.sal').forEach(function(s){
    s.style.background=salColor(parseFloat(s.dataset[mode]));});
  document.querySelectorAll('#target-saliency button.btn').forEach(function(b){
    b.classList.toggle('on',b.dataset.mode===mode);});
}
document.addEventListener('DOMContentLoaded',function(){
  document.querySelectorAll('#target-saliency button.btn').forEach(function(b){
    b.addEventListener('click',function(){setMode(b.dataset.mode);});});
  setMode('a');
});
"""


def sal_color(v: float) -> str:
    """Background for a saliency in [0, 1] (same formula as the page's JS)."""
    return f"rgba(253,140,0,{0.05 + 0.85 * min(max(v, 0.0), 1.0):.3f})"


def score_color(s: float, lo: float = 0.0, hi: float = 1.0) -> str:
    """Background for a match score ``s_j``: green, darker towards ``hi`` from ``max(lo, 0)``; red if negative."""
    if s < 0:
        return f"rgba(207,34,46,{0.15 + 0.7 * min(abs(s) / max(abs(lo), 1e-9), 1.0):.3f})"
    base = max(lo, 0.0)
    t = min(max((s - base) / max(hi - base, 1e-9), 0.0), 1.0)
    return f"rgba(46,160,67,{0.06 + 0.84 * t:.3f})"


def _tok(text: str) -> str:
    """Escaped token text; a newline gets a visible mark before it."""
    return escape(text.replace("\n", "↵\n"))


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain table; numbers are right-aligned, everything escaped."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f'<td class="n">{v:.4g}</td>'
        if isinstance(v, int):
            return f'<td class="n">{v}</td>'
        return f"<td>{escape(str(v))}</td>"

    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def visible(text: str) -> str:
    """A token class string with its spaces and newlines made visible (for tables)."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def target_block(v: TargetView) -> str:
    """One target example, each token's background its saliency (data-q/k/a feed the JS toggle)."""
    tpl = is_template(v.codes)
    parts = []
    for i, text in enumerate(v.tokens):
        q, k, a = float(v.q[i]), float(v.k[i]), float(v.alpha[i])
        cls = "sal tpl" if tpl[i] else ("sal" if v.scored[i] else "sal uns")
        title = f"Q {q:.3f} · K {k:.3f} · α {a:.3f}" + ("" if v.scored[i] else " · not fingerprinted")
        parts.append(
            f'<span class="{cls}" data-q="{q:.4f}" data-k="{k:.4f}" data-a="{a:.4f}" '
            f'style="background:{sal_color(a)}" title="{escape(title)}">{_tok(text)}</span>'
        )
    meta = f"target {escape(v.record.id)} · source {escape(v.record.source)} · {len(v.tokens)} tokens"
    return f'<div class="rec"><div class="meta">{meta}</div><div class="toks">{"".join(parts)}</div></div>'


def record_block(
    v: RecordView,
    rank: int,
    stored_score: float,
    selected: bool,
    oov_penalty: float | None,
    scale: tuple[float, float] = (0.0, 1.0),
) -> str:
    """One pool record, each scored token's background its ``s_j`` on ``scale``; unseen-class tokens underlined."""
    tpl = is_template(v.codes)
    parts = []
    for i, text in enumerate(v.tokens):
        if v.in_m[i]:
            s = float(v.s[i])
            if v.direct[i]:
                cls, title = "", f"s {s:.3f}"
            else:
                cls, title = "oov", f"s {s:.3f} · unseen class → {visible(v.backoff[i] or '?')} (λ={oov_penalty})"
            parts.append(
                f'<span class="{cls}" style="background:{score_color(s, *scale)}" title="{escape(title)}">'
                f"{_tok(text)}</span>"
            )
        else:
            cls, title = ("tpl", "template (not scored)") if tpl[i] else ("uns", "not scored")
            parts.append(f'<span class="{cls}" title="{title}">{_tok(text)}</span>')
    n = len(v.tokens)
    meta = (
        f"<b>#{rank}</b> {'selected' if selected else 'not selected'} · id {escape(v.record.id)} · "
        f"source {escape(v.record.source)} · <b>score {stored_score:.4f}</b> "
        f"(recomputed {v.score:.4f}) · mean {v.mean:.4f} · max {v.max:.4f} · coverage {v.coverage:.3f} "
        f"· {v.n_scored}/{n} tokens scored, {int(v.oov.sum())} via unseen-class backoff"
    )
    return (
        f'<div class="rec" data-index="{v.record.index}"><div class="meta">{meta}</div>'
        f'<div class="toks">{"".join(parts)}</div></div>'
    )


def figure(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{escape(alt)}">'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document; ``sections`` are ``(id, title, inner html)``."""
    nav = "".join(f'<a href="#{sid}">{escape(t)}</a>' for sid, t, _ in sections)
    body = "".join(section(sid, t, inner) for sid, t, inner in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
        f"<body><header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header><nav>{nav}</nav>"
        f"<main>{body}</main><script>{JS}</script></body></html>\n"
    )


def score_legend(lo: float, hi: float) -> str:
    """Explains the record colors; the green scale spans the shown tokens' ``s_j`` range."""
    base = max(lo, 0.0)
    grad = ", ".join(score_color(x, lo, hi) for x in np.linspace(base, hi, 5))
    neg = f" (negative s<sub>j</sub>: red, down to {lo:.2f})" if lo < 0 else ""
    return (
        f'<p class="note">Background: match score s<sub>j</sub> (eq. 10-12), {base:.2f} '
        f'<span class="legend" style="background:linear-gradient(to right, {grad})"></span> {hi:.2f}'
        f"{neg}; the scale spans the shown tokens. "
        '<span class="oov">Dotted underline</span>: the token\'s class was not in the target, scored against '
        'the nearest fingerprinted class (eq. 11) times λ. <span class="tpl">Grey</span>: template or '
        "out-of-scope tokens, never scored. Hover a token for its numbers.</p>"
    )
