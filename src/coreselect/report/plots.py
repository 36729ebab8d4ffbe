"""The report's figures (matplotlib ``Figure`` objects, Agg canvas, no pyplot global state).

Every function returns PNG bytes; :func:`data_uri` embeds them in the HTML.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

POOL_COLOR = "#9aa5b1"
CORE_COLOR = "#d9480f"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(w: float, h: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def score_histogram(scores: np.ndarray, cut: float | None, n_selected: int) -> bytes:
    """Histogram of the finite pool scores with a vertical line at the budget's cut."""
    fig, (ax,) = _figure(8, 3.2)
    finite = scores[np.isfinite(scores)]
    if finite.size:
        ax.hist(finite, bins=min(60, max(10, finite.size // 5)), color=POOL_COLOR, edgecolor="white")
    if cut is not None and np.isfinite(cut):
        ax.axvline(cut, color=CORE_COLOR, lw=2, label=f"cut: top {n_selected} selected")
        ax.legend(loc="upper left", frameon=False)
    n_inf = int(scores.size - finite.size)
    ax.set_xlabel("score" + (f"  ({n_inf} records with no scored token not shown)" if n_inf else ""))
    ax.set_ylabel("records")
    return _png(fig)


def _source_mix_ax(ax: Axes, pool: Sequence[str], core: Sequence[str], title: str, top: int = 12) -> None:
    pc, cc = Counter(pool), Counter(core)
    names = [n for n, _ in pc.most_common(top)]
    y = np.arange(len(names))
    tot_p, tot_c = max(sum(pc.values()), 1), max(sum(cc.values()), 1)
    ax.barh(y - 0.2, [pc[n] / tot_p for n in names], 0.4, color=POOL_COLOR, label="pool")
    ax.barh(y + 0.2, [cc[n] / tot_c for n in names], 0.4, color=CORE_COLOR, label="coreset")
    ax.set_yticks(y, [n[:28] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("share of records")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8)


def source_mix(panels: Sequence[tuple[str, Sequence[str], Sequence[str]]]) -> bytes:
    """Pool vs coreset source shares, one subplot per ``(title, pool_sources, coreset_sources)``."""
    fig, axes = _figure(max(6.0, 4.2 * len(panels)), 3.6, len(panels))
    for ax, (title, pool, core) in zip(axes, panels):
        _source_mix_ax(ax, pool, core, title)
    return _png(fig)


def length_dist(panels: Sequence[tuple[str, np.ndarray, np.ndarray, str]]) -> bytes:
    """Length histograms (density) of pool vs coreset, one subplot per ``(title, pool, coreset, unit)``."""
    fig, axes = _figure(max(6.0, 4.2 * len(panels)), 3.2, len(panels))
    for ax, (title, pool, core, unit) in zip(axes, panels):
        hi = max(int(pool.max()) if pool.size else 1, 1)
        bins = np.linspace(0, hi, 31).tolist()  # matplotlib's stubs take a Sequence[float], not an ndarray
        ax.hist(
            pool,
            bins=bins,
            density=True,
            color=POOL_COLOR,
            alpha=0.7,
            label=f"pool (median {np.median(pool):.0f})" if pool.size else "pool",
        )
        if core.size:
            ax.hist(
                core,
                bins=bins,
                density=True,
                histtype="step",
                lw=2,
                color=CORE_COLOR,
                label=f"coreset (median {np.median(core):.0f})",
            )
        ax.set_xlabel(f"length ({unit})")
        ax.set_ylabel("density")
        ax.set_title(title, fontsize=10)
        ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def jaccard_matrix(names: Sequence[str], m: np.ndarray) -> bytes:
    """Heatmap of the pairwise Jaccard overlap of the coresets."""
    n = len(names)
    fig, (ax,) = _figure(1.6 + 0.9 * n, 1.2 + 0.8 * n)
    im = ax.imshow(m, vmin=0, vmax=1, cmap="Oranges")
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="white" if m[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)
