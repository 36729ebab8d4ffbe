"""`coreselect compare` and the shared warmup, end to end on a tiny random-init model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from coreselect.__main__ import main
from coreselect.compare import jaccard, length_bias


def test_jaccard_hand_values():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) == 1.0
    assert jaccard({1}, {2}) == 0.0


def test_length_bias_hand_values():
    lengths = np.array([10, 20, 30, 40])
    assert length_bias(np.array([4.0, 3.0, 2.0, 1.0]), lengths) == pytest.approx(-1.0)  # shortest first
    assert length_bias(np.array([0.1, 0.2, 0.3, 0.4]), lengths) == pytest.approx(1.0)
    # ranks (1, 3, 2, 4) vs (1, 2, 3, 4): 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    assert length_bias(np.array([1.0, 3.0, 2.0, 4.0]), lengths) == pytest.approx(0.8)
    # unscorable records (-inf, nan) are left out: the rest is perfectly decreasing
    assert length_bias(np.array([3.0, -np.inf, 2.0, np.nan, 1.0]), np.array([1, 2, 3, 4, 5])) == pytest.approx(-1.0)
    # ties take average ranks: scores (1, 1, 2) -> ranks (1.5, 1.5, 3), lengths (1, 2, 3)
    assert length_bias(np.array([1.0, 1.0, 2.0]), np.array([1, 2, 3])) == pytest.approx(0.8660254, abs=1e-6)
    assert length_bias(np.array([1.0, 1.0]), np.array([1, 2])) is None  # constant scores
    assert length_bias(np.array([1.0]), np.array([1])) is None


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
    # the length-bias column is the Spearman rho of the method's own scores with the token lengths
    bm25 = pq.read_table(out / "bm25" / "scores.parquet")
    trim = pq.read_table(out / "trim" / "scores.parquet")
    lengths = dict(zip(trim.column("index").to_pylist(), trim.column("n_tokens").to_pylist()))
    bm25_lengths = np.array([lengths[i] for i in bm25.column("index").to_pylist()])
    expect = length_bias(bm25.column("score").to_numpy(), bm25_lengths)
    assert (float(rows[2]["length_rho"]) if rows[2]["length_rho"] else None) == (
        None if expect is None else pytest.approx(expect, abs=1e-4)
    )
    md = (out / "comparison.md").read_text()
    assert "## Overlap (Jaccard)" in md and "| trim | 1.00 |" in md and "ρ(score, len)" in md
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
    assert "| ρ(score, len) | AER |" in md and "lower is better" in md
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


def _scores(x, y=None, selected=(0, 1), k=None):
    import pyarrow as pa

    n = len(x)
    cols = {"index": list(range(n)), "score": [0.0] * n, "selected": [i in selected for i in range(n)]}
    cols["score_x"] = x
    if y is not None:
        cols["score_y"] = y
    return pa.table(cols)


def test_target_comparison_hand_values():
    from coreselect.compare import target_comparison, target_names

    tables = {
        "a": _scores([4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], selected=(0, 3)),
        "b": _scores([1.0, 3.0, 2.0, 4.0], selected=(1, 3)),  # no score_y
    }
    runs = {"a": {"targets": {"names": ["y", "x"], "coverage": {"x": {"k": 2, "in_coreset": 1}}}}, "b": {}}
    assert target_names(tables, runs) == ["y", "x"]
    t = target_comparison(tables, runs)
    assert list(t) == ["y", "x"]
    # x: a's own top-2 = {0, 1} (k from its run.json), b's = {3, 1} (k = its 2 selected)
    assert t["x"]["k"] == {"a": 2, "b": 2}
    assert t["x"]["coverage"] == {"a": 1, "b": 2}  # a: run.json's count; b: {1, 3} & {1, 3}
    assert t["x"]["jaccard"]["a"]["b"] == round(1 / 3, 4) and t["x"]["jaccard"]["b"]["b"] == 1.0
    # ranks a: [0, 1, 2, 3], b: [3, 1, 2, 0] -> Spearman -0.8
    assert t["x"]["spearman"]["a"]["b"] == -0.8 and t["x"]["spearman"]["a"]["a"] == 1.0
    # y: only a has it; a's top-2 = {3, 2}, coverage {0, 3} & {2, 3} = 1
    assert t["y"]["coverage"] == {"a": 1, "b": None} and t["y"]["k"] == {"a": 2, "b": None}
    assert t["y"]["jaccard"]["a"]["b"] is None and t["y"]["spearman"]["b"]["b"] is None
    assert target_comparison({"a": _scores([1.0, 2.0])}, {}) == {}  # one target: nothing to add


def test_compare_named_targets_per_target_columns(tiny_model_dir, small_pool, tmp_path):
    from tests.conftest import chat, write_jsonl

    pool, math = small_pool
    other = write_jsonl(
        tmp_path / "other.jsonl",
        [
            chat(200, "Write a short poem about rivers.", "The river runs, the river sings.", "poems"),
            chat(201, "How do I make pancakes?", "Mix flour, eggs and milk, then fry.", "cooking"),
        ],
    )
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "trim,bm25", "--model", str(tiny_model_dir), "--pool", str(pool)]
    argv += ["--target", f"math={math}", f"other={other}", "--budget", "4", "--out", str(out), "--layers", "2"]
    assert main([*argv, "--warmup", "none", "--no-progress"]) == 0
    runs = {m: json.loads((out / m / "run.json").read_text()) for m in ("trim", "bm25")}
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    for r in rows:
        for name in ("math", "other"):
            assert int(r[f"cov:{name}"]) == runs[r["method"]]["targets"]["coverage"][name]["in_coreset"]
    t = json.loads((out / "run.json").read_text())["targets"]
    assert list(t) == ["math", "other"]
    for name in ("math", "other"):
        assert t[name]["k"] == {"trim": 2, "bm25": 2}  # quota: 4 split equally
        assert t[name]["jaccard"]["trim"]["trim"] == 1.0 and t[name]["spearman"]["bm25"]["bm25"] == 1.0
        assert t[name]["jaccard"]["trim"]["bm25"] == t[name]["jaccard"]["bm25"]["trim"]
        # the per-target top-k is each method's own ranking of its score_<name> column
        tab = pq.read_table(out / "trim" / "scores.parquet")
        top = {i for i, r in zip(tab.column("index").to_pylist(), tab.column(f"rank_{name}").to_pylist()) if r <= 2}
        sel = {i for i, s in zip(tab.column("index").to_pylist(), tab.column("selected").to_pylist()) if s}
        assert t[name]["coverage"]["trim"] == len(top & sel)
    md = (out / "comparison.md").read_text()
    assert "## Per target" in md and "### math: own top-k overlap (Jaccard)" in md
    assert "| trim | 1.00 / 1.00 |" in md
