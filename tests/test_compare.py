"""`coreselect compare` and the shared warmup, end to end on a tiny random-init model."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq

from coreselect.__main__ import main
from coreselect.compare import jaccard


def test_jaccard_hand_values():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) == 1.0
    assert jaccard({1}, {2}) == 0.0


def test_compare_end_to_end_with_shared_warmup(tiny_model_dir, small_pool, tmp_path):
    pool, target = small_pool
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "--methods",
            "trim,random,bm25",
            "--model",
            str(tiny_model_dir),
            "--pool",
            str(pool),
            "--target",
            str(target),
            "--budget",
            "3",
            "--out",
            str(out),
            "--layers",
            "2",
            "--no-progress",
            "--warmup",
            "auto",
            "--warmup-fraction",
            "0.5",
            "--warmup-epochs",
            "1",
            "--warmup-lora-r",
            "4",
            "--warmup-lora-alpha",
            "8",
            "--warmup-batch-size",
            "2",
            "--warmup-grad-accum",
            "1",
        ]
    )
    assert rc == 0
    adapter = out / "warmup" / "adapter"
    assert (adapter / "adapter_config.json").exists()  # trained once, shared
    trim_run = json.loads((out / "trim" / "run.json").read_text())
    assert trim_run["settings"]["warmup"] == str(adapter)
    for m in ("trim", "random", "bm25"):
        assert pq.read_table(out / m / "scores.parquet").num_rows == 8
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["trim", "random", "bm25"]
    assert all(int(r["selected"]) == 3 for r in rows)
    assert float(rows[0]["forward_passes"]) >= 8  # trim scored every record
    for r in rows:  # source mix sums to 100%
        assert abs(sum(float(v) for k, v in r.items() if k.startswith("mix:")) - 100) < 0.5
    md = (out / "comparison.md").read_text()
    assert "## Overlap (Jaccard)" in md and "| trim | 1.00 |" in md
    assert (out / "source_mix.png").stat().st_size > 1000 and (out / "lengths.png").stat().st_size > 1000


def test_select_with_auto_warmup_trains_and_reuses_adapter(tiny_model_dir, small_pool, tmp_path):
    pool, target = small_pool
    out = tmp_path / "w"
    args = [
        "select",
        "--model",
        str(tiny_model_dir),
        "--pool",
        str(pool),
        "--target",
        str(target),
        "--budget",
        "2",
        "--out",
        str(out),
        "--layers",
        "2",
        "--no-progress",
        "--warmup-fraction",
        "0.5",
        "--warmup-epochs",
        "1",
        "--warmup-lora-r",
        "4",
        "--warmup-lora-alpha",
        "8",
        "--warmup-grad-accum",
        "1",
    ]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["warmup"]["mode"] == "auto" and run["model"]["warmup"]["n_records"] == 4
    first = pq.read_table(out / "scores.parquet").column("score").to_pylist()
    # reuse the saved adapter explicitly: same scores
    assert main([*args, "--warmup", str(out / "warmup" / "adapter"), "--out", str(tmp_path / "w2")]) == 0
    again = pq.read_table(tmp_path / "w2" / "scores.parquet").column("score").to_pylist()
    assert first == again
    # the warmup changed the scoring model: scores differ from the base model's
    assert main([*args, "--warmup", "none", "--out", str(tmp_path / "w3")]) == 0
    base = pq.read_table(tmp_path / "w3" / "scores.parquet").column("score").to_pylist()
    assert base != first


def test_compare_aer_column_only_for_methods_that_report_it(tiny_model_dir, small_pool, tmp_path):
    pool, target = small_pool
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--methods",
                "p2d,random",
                "--model",
                str(tiny_model_dir),
                "--pool",
                str(pool),
                "--target",
                str(target),
                "--budget",
                "3",
                "--out",
                str(out),
                "--no-progress",
                "--warmup",
                "none",
                "--max-length",
                "128",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    aer = json.loads((out / "p2d" / "run.json").read_text())["aer"]["aer"]
    assert float(rows[0]["aer"]) == round(aer, 4) and aer > 0 and rows[1]["aer"] == ""
    md = (out / "comparison.md").read_text()
    assert "| median len | AER |" in md and "lower is better" in md
    assert f"| {round(aer, 4):.3f} |" in md.splitlines()[4] and md.splitlines()[5].endswith("| |")


def test_overwrite_retrains_the_warmup_and_clears_old_rejects(tiny_model_dir, small_pool, tmp_path):
    pool, target = small_pool
    out = tmp_path / "o"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pool.read_text() + '{"id": "x", "messages": []}\n')
    common = [
        "select",
        "--model",
        str(tiny_model_dir),
        "--target",
        str(target),
        "--budget",
        "2",
        "--out",
        str(out),
        "--layers",
        "2",
        "--no-progress",
        "--warmup-fraction",
        "0.5",
        "--warmup-epochs",
        "1",
        "--warmup-lora-r",
        "4",
        "--warmup-lora-alpha",
        "8",
        "--warmup-grad-accum",
        "1",
    ]
    assert main([*common, "--pool", str(bad), "--on-bad-record", "skip"]) == 0
    assert (out / "rejects.jsonl").exists()
    first = (out / "warmup" / "adapter" / "adapter_config.json").stat().st_mtime_ns
    assert main([*common, "--pool", str(pool), "--overwrite"]) == 0
    assert not (out / "rejects.jsonl").exists()
    run = json.loads((out / "run.json").read_text())
    assert "reused_from_previous_run" not in run["model"]["warmup"]
    assert (out / "warmup" / "adapter" / "adapter_config.json").stat().st_mtime_ns != first
    # --resume does reuse the finished warmup
    assert main([*common, "--pool", str(pool), "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())["model"]["warmup"]["reused_from_previous_run"] is True
