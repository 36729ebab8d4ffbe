"""``coreselect report`` / ``explain`` end to end on the tiny random-init Llama."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from coreselect.__main__ import main

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium package; .ci/run installs it
PANELS = [
    "run-summary",
    "target-saliency",
    "fingerprint-classes",
    "top-records",
    "below-cut",
    "score-histogram",
    "source-mix",
    "length-dist",
]


class Page(HTMLParser):
    """Collects element ids, img srcs, every src/href, token spans and the script text."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.spans: list[dict[str, str | None]] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "img":
            self.imgs.append(str(a.get("src")))
        self.links += [str(v) for k, v in attrs if k in ("src", "href")]
        if tag == "span":
            self.spans.append(a)
        self.scripts += tag == "script"


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _select(model, pool, target, out, *extra):
    return main(
        [
            "select",
            "--model",
            str(model),
            "--pool",
            str(pool),
            "--target",
            str(target),
            "--out",
            str(out),
            "--warmup",
            "none",
            "--layers",
            "2",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture()
def trim_run(tiny_model_dir, small_pool, tmp_path) -> Path:
    pool, target = small_pool
    out = tmp_path / "trim"
    assert _select(tiny_model_dir, pool, target, out, "--budget", "3") == 0
    return out


def test_report_has_every_panel_and_is_self_contained(trim_run):
    assert main(["report", str(trim_run), "--top", "2", "--below", "2", "--no-progress"]) == 0
    html = trim_run / "report.html"
    page = parse(html)
    assert set(PANELS) <= page.ids
    assert page.imgs and all(s.startswith("data:image/png;base64,") for s in page.imgs)
    assert not [u for u in page.links if u.startswith(("http://", "https://", "//"))]
    assert {p.name for p in (trim_run / "report").glob("*.png")} >= {
        "score-histogram.png",
        "source-mix.png",
        "length-dist.png",
    }
    text = html.read_text(encoding="utf-8")
    # 2 top + 2 below-cut records, each with the pooled terms; target tokens carry q/k/alpha for the toggle
    assert text.count('class="rec" data-index=') == 4
    assert "coverage" in text and "mean" in text
    sal = [s for s in page.spans if "sal" in (s.get("class") or "")]
    assert sal and all(s.get("data-q") and s.get("data-k") and s.get("data-a") for s in sal)
    assert any("tpl" in (s.get("class") or "") for s in page.spans)  # template tokens greyed


@pytest.mark.parametrize("options", [(), ("--token-weighting", "idf", "--min-tokens", "40")])
def test_report_scores_match_the_run(options, tiny_model_dir, small_pool, tmp_path):
    """The token views re-score records with the run's own options (pooling weights, min_tokens too)."""
    from coreselect.report.build import RunData
    from coreselect.report.tokens import Explainer, read_by_index

    pool, target = small_pool
    trim_run = tmp_path / "trim"
    assert _select(tiny_model_dir, pool, target, trim_run, "--budget", "3", *options) == 0
    r = RunData.load(trim_run)
    ex = Explainer(trim_run)
    assert (ex.config.token_weighting, ex.config.min_tokens) == (("idf", 40) if options else ("none", 0))
    rows = r.by_rank(1, 3)
    recs = read_by_index(ex.args.pool, [int(r.index[i]) for i in rows])
    views = ex.record_views([recs[int(r.index[i])] for i in rows])
    np.testing.assert_allclose([v.score for v in views], r.score[rows], atol=1e-5)
    for v in views:
        assert v.n_scored == int(v.in_m.sum()) and len(v.tokens) == len(v.s)
    assert "".join(views[0].tokens).startswith("<|im_start|>")  # token texts tile the rendered record


def test_report_escapes_record_text(tiny_model_dir, tmp_path):
    from conftest import chat, write_jsonl

    evil = "<script>alert(1)</script> & <img src=http://x>"
    pool = write_jsonl(
        tmp_path / "p.jsonl", [chat(i, f"What is {i} plus 2? {evil}", f"{i} + 2 = {i + 2}.", evil) for i in range(4)]
    )
    target = write_jsonl(tmp_path / "t.jsonl", [chat(9, "What is 3 plus 4?", "3 + 4 = 7.")])
    out = tmp_path / "run"
    assert _select(tiny_model_dir, pool, target, out, "--budget", "2") == 0
    assert main(["report", str(out), "--no-progress"]) == 0
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in text and "&lt;script&gt;" in text
    assert parse(out / "report.html").scripts == 1


def test_explain_prints_tokens_with_scores(trim_run, capsys):
    assert main(["explain", str(trim_run), "--index", "2"]) == 0  # captured stdout is not a TTY: plain
    out = capsys.readouterr().out
    row = pq.read_table(trim_run / "scores.parquet").to_pylist()[2]
    assert f"record 2 · id {row['id']}" in out
    assert "[" in out and "|" in out and "mean" in out and "coverage" in out
    import re

    assert re.search(r"\[[^\[\]|]+\|-?\d\.\d\d~?\]", out)
    assert f"stored {row['score']:.4f}" in out


def test_explain_ansi_when_tty(trim_run):
    from coreselect.report.terminal import ExplainArgs, explain

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    buf = Tty()
    view = explain(ExplainArgs(dir=str(trim_run), index=0), stream=buf)
    assert "\x1b[48;2;" in buf.getvalue() and view.n_scored > 0
    plain = io.StringIO()
    explain(ExplainArgs(dir=str(trim_run), index=0, plain=True), stream=plain)
    assert "\x1b[" not in plain.getvalue()


def test_explain_errors(trim_run, capsys):
    assert main(["explain", str(trim_run)]) == 2
    assert main(["explain", str(trim_run), "--index", "99"]) == 2
    assert "no such pool record" in capsys.readouterr().err


def test_report_on_random_run_has_only_distributions(small_pool, tmp_path):
    pool, _ = small_pool
    out = tmp_path / "rand"
    assert (
        main(["select", "--method", "random", "--pool", str(pool), "--out", str(out), "--budget", "3", "--no-progress"])
        == 0
    )
    assert main(["report", str(out), "--no-progress"]) == 0
    page = parse(out / "report.html")
    assert {"score-histogram", "source-mix", "length-dist"} <= page.ids
    assert not {"target-saliency", "top-records"} & page.ids
    assert main(["explain", str(out), "--index", "0"]) == 2  # no fingerprints


def test_compare_folder(trim_run, small_pool, tmp_path):
    pool, _ = small_pool
    cmp_dir = tmp_path / "cmp"
    cmp_dir.mkdir()
    shutil.copytree(trim_run, cmp_dir / "trim")
    assert (
        main(
            [
                "select",
                "--method",
                "random",
                "--pool",
                str(pool),
                "--out",
                str(cmp_dir / "random"),
                "--budget",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    (cmp_dir / "run.json").write_text(json.dumps({"command": "compare"}))
    assert main(["report", str(cmp_dir), "--no-progress"]) == 0
    page = parse(cmp_dir / "report.html")
    assert {"source-mix", "length-dist", "jaccard"} <= page.ids
    assert all(s.startswith("data:image/png;base64,") for s in page.imgs) and len(page.imgs) == 3
    text = (cmp_dir / "report.html").read_text(encoding="utf-8")
    assert "trim" in text and "random" in text
    assert text.split('id="jaccard"')[1].count('<td class="n">1</td>') == 2  # the diagonal


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_chromium() -> str:
    """The browser's path; without one, skip on a workstation but fail under CI (``CI`` set), where
    ``.ci/run`` installs it: the browser test must never pass there by being skipped."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    msg = f"needs {CHROMIUM} (Debian: apt-get install chromium)"
    if _ci():
        pytest.fail(f"CI={os.environ['CI']} but {msg}; .ci/run should have installed it", pytrace=False)
    pytest.skip(msg)


@pytest.fixture()
def chromium() -> str:
    return require_chromium()


def test_missing_chromium_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setitem(globals(), "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but needs /nonexistent/chromium"):
        require_chromium()
    for value in ("", "0", "false"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception):
            require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_chromium()


def test_report_renders_in_headless_chromium(chromium, trim_run, tmp_path):
    assert main(["report", str(trim_run), "--top", "3", "--below", "2", "--no-progress"]) == 0
    html = (trim_run / "report.html").resolve()
    shot = tmp_path / "shot.png"
    # --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers have a tiny /dev/shm
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={tmp_path / 'prof'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=3000",
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", html.as_uri()],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="top-records"' in dom.stdout
    # the toggle's script ran on load: the combined-saliency button is the active one
    assert 'class="btn on" data-mode="a"' in dom.stdout
    errors = [line for line in dom.stderr.splitlines() if "Uncaught" in line or ("CONSOLE" in line and "rror" in line)]
    assert not errors, errors
    png = subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2000", html.as_uri()],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert png.returncode == 0 and shot.stat().st_size > 10_000, png.stderr[-2000:]
