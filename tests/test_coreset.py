"""``coreselect.load_coreset(out_dir)``: the coreset as a ``datasets.Dataset`` with its scores joined."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

import coreselect
from coreselect.__main__ import main
from coreselect.errors import CoreselectError


def _bm25(pool, target, out, budget="3"):
    return main(
        [
            "select",
            "--pool",
            str(pool),
            "--target",
            str(target),
            "--out",
            str(out),
            "--method",
            "bm25",
            "--budget",
            budget,
            "--no-progress",
        ]
    )


def test_load_coreset_joins_scores(small_pool, tmp_path):
    import datasets

    pool, target = small_pool
    run = tmp_path / "run"
    assert _bm25(pool, target, run) == 0
    ds = coreselect.load_coreset(run)
    assert isinstance(ds, datasets.Dataset) and ds.num_rows == 3
    assert ds.column_names == [
        "id",
        "dataset",
        "messages",
        "score",
        "rank",
        "n_tokens",
        "n_scored",
        "pool_index",
        "pool_id",
        "pool_source",
    ]
    scores = pq.read_table(run / "scores.parquet").to_pylist()
    by_id = {r["id"]: r for r in scores}
    assert ds["rank"] == [1, 2, 3]
    assert ds["score"] == sorted(ds["score"], reverse=True)
    for row in ds:
        sc = by_id[row["pool_id"]]
        assert row["id"] == row["pool_id"] and sc["selected"]
        assert (row["score"], row["rank"], row["pool_index"], row["pool_source"]) == (
            sc["score"],
            sc["rank"],
            sc["index"],
            sc["source"],
        )
    # the records are the coreset.jsonl records, verbatim and best first
    coreset = [json.loads(line) for line in (run / "coreset.jsonl").read_text().splitlines()]
    assert (
        ds.remove_columns(["score", "rank", "n_tokens", "n_scored", "pool_index", "pool_id", "pool_source"]).to_list()
        == coreset
    )
    assert coreselect.load_coreset(run, scores=False).column_names == ["id", "dataset", "messages"]


def test_load_coreset_keeps_record_fields_that_share_a_score_name(tmp_path):
    rows = [
        {"instruction": f"q{i}", "output": f"a{i}", "score": 10 * i, **({"extra": i} if i % 2 else {})}
        for i in range(6)
    ]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    run = tmp_path / "run"
    assert (
        main(["select", "--pool", str(pool), "--out", str(run), "--method", "random", "--budget", "4", "--no-progress"])
        == 0
    )
    ds = coreselect.load_coreset(run)
    assert "score" in ds.column_names and "coreselect_score" in ds.column_names
    assert all(r["score"] == 10 * int(r["instruction"][1:]) for r in ds)  # the record's own field, untouched
    assert all(r["extra"] is None or r["extra"] % 2 for r in ds)  # a field missing in some records: None there
    assert ds["rank"] == [1, 2, 3, 4]


def test_load_coreset_errors(small_pool, tmp_path):
    pool, target = small_pool
    with pytest.raises(CoreselectError, match="no such run folder"):
        coreselect.load_coreset(tmp_path / "nope")
    with pytest.raises(CoreselectError, match=r"not a finished selection run \(no coreset.jsonl\)"):
        coreselect.load_coreset(tmp_path)
    run = tmp_path / "run"
    assert _bm25(pool, target, run) == 0
    lines = (run / "coreset.jsonl").read_text().splitlines()
    (run / "coreset.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(CoreselectError, match="has 2 records but scores.parquet selects 3"):
        coreselect.load_coreset(run)
    (run / "coreset.jsonl").write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    with pytest.raises(CoreselectError, match="mixes two runs"):
        coreselect.load_coreset(run)
