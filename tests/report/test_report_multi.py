"""``coreselect report`` on a multi-target run (issue 14 §1): per-target coverage and overlap from run.json."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import chat, write_jsonl
from test_report import parse

from coreselect.__main__ import main


@pytest.fixture()
def multi_run(tiny_model_dir, small_pool, tmp_path, one_torch_thread):
    pool, math = small_pool
    other = write_jsonl(
        tmp_path / "other.jsonl",
        [
            chat(200, "Write a short poem about rivers.", "The river runs, the river sings.", "poems"),
            chat(201, "How do I make pancakes?", "Mix flour, eggs and milk, then fry.", "cooking"),
        ],
    )
    out = tmp_path / "multi"
    argv = ["select", "--model", str(tiny_model_dir), "--pool", str(pool), "--out", str(out), "--no-progress"]
    argv += ["--target", f"math={math}", f"other={other}", "--warmup", "none", "--layers", "2", "--budget", "4"]
    assert main(argv) == 0
    return out


def test_report_shows_coverage_and_overlap(multi_run, capsys):
    assert main(["report", str(multi_run), "--no-progress"]) == 0
    html = multi_run / "report.html"
    page = parse(html)
    assert {"run-summary", "targets", "score-histogram", "source-mix", "length-dist"} <= page.ids
    assert not {"target-saliency", "top-records"} & page.ids  # token views need a single-target run
    assert (multi_run / "report" / "target-mix.png").is_file()
    text = html.read_text(encoding="utf-8")
    assert "fingerprints-&lt;name&gt;.safetensors" in text and "keeps no token fingerprints" not in text
    assert "math, other (combine: quota)" in text
    t = json.loads((multi_run / "run.json").read_text())["targets"]
    section = text.split('id="targets"')[1].split("</section>")[0]
    for name in ("math", "other"):
        c = t["coverage"][name]
        assert f"{c['in_coreset']}/{c['k']} (" in section
    # overlap matrix: k on the diagonal, the run's shared count off it
    rows = section.split("<tbody>")[2].split("</tbody>")[0].split("</tr>")
    assert rows[0].startswith(f'<tr><td>math</td><td class="n">{t["coverage"]["math"]["k"]}</td>')
    assert f'<td class="n">{t["overlap"]["math|other"]}</td>' in rows[0]
    assert main(["explain", str(multi_run), "--index", "0"]) == 2
    assert "multi-target run" in capsys.readouterr().err


def test_coverage_from_scores_when_run_json_lacks_it(multi_run):
    from coreselect.combine import coverage_report
    from coreselect.report.build import RunData

    run = json.loads((multi_run / "run.json").read_text())
    r = RunData.load(multi_run)
    assert r.target_info()["coverage"] == run["targets"]["coverage"]
    assert set(r.targets) == {"math", "other"}
    t_cov, t_overlap = run["targets"].pop("coverage"), run["targets"].pop("overlap")
    (multi_run / "run.json").write_text(json.dumps(run))
    info = RunData.load(multi_run).target_info()
    t = pq.read_table(multi_run / "scores.parquet").sort_by("index")
    per = {n: t.column(f"score_{n}").to_numpy() for n in ("math", "other")}
    sel = np.flatnonzero(t.column("selected").to_numpy(zero_copy_only=False))
    # quota 50/50 of 4: each target's own top-2, as select computed it
    assert {k: info[k] for k in ("coverage", "overlap")} == coverage_report(per, sel, {"math": 2, "other": 2})
    assert info["coverage"] == t_cov and info["overlap"] == t_overlap
    run["targets"]["combine"] = "max"  # other modes: each target's own top-k is the whole budget
    (multi_run / "run.json").write_text(json.dumps(run))
    info = RunData.load(multi_run).target_info()
    assert {k: info[k] for k in ("coverage", "overlap")} == coverage_report(per, sel, {"math": 4, "other": 4})
    assert main(["report", str(multi_run), "--no-progress"]) == 0
    assert "targets" in parse(multi_run / "report.html").ids


def test_single_target_run_has_no_target_info(small_pool, tmp_path):
    from coreselect.report.build import RunData

    pool, _ = small_pool
    out = tmp_path / "rand"
    assert main(["select", "--method", "random", "--pool", str(pool), "--out", str(out), "--no-progress"]) == 0
    assert RunData.load(out).target_info() is None and RunData.load(out).targets == {}


def test_compare_folder_report_per_target(tiny_model_dir, small_pool, tmp_path, one_torch_thread):
    pool, math = small_pool
    other = write_jsonl(
        tmp_path / "other.jsonl", [chat(200, "Write a short poem about rivers.", "The river runs.", "p")]
    )
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "trim,bm25", "--model", str(tiny_model_dir), "--pool", str(pool), "--out", str(out)]
    argv += ["--target", f"math={math}", f"other={other}", "--budget", "4", "--layers", "2", "--warmup", "none"]
    assert main([*argv, "--no-progress"]) == 0
    assert main(["report", str(out), "--no-progress"]) == 0
    page = parse(out / "report.html")
    assert {"run-summary", "jaccard", "targets"} <= page.ids
    section = (out / "report.html").read_text(encoding="utf-8").split('id="targets"')[1].split("</section>")[0]
    t = json.loads((out / "run.json").read_text())["targets"]
    for m in ("trim", "bm25"):
        cells = [f"<td>{t[n]['coverage'][m]}/{t[n]['k'][m]}</td>" for n in ("math", "other")]
        assert f"<tr><td>{m}</td>{''.join(cells)}</tr>" in section
    assert section.count("<td>1.00 / 1.00</td>") == 4  # each target's diagonal
