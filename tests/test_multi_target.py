"""Several named targets in one select run (issue 14 §1): TRIM and BM25 natively, Random (and
CLD, TAGCOS, S2L) via the per-target fallback (:class:`coreselect.methods.multi.PerTarget`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from tests.conftest import chat, write_jsonl

from coreselect.__main__ import main
from coreselect.config import SelectArgs, args_from_dict
from coreselect.errors import ConfigError

BASE_COLUMNS = ["index", "id", "source", "n_tokens", "n_scored", "score", "rank", "selected"]


def _run(out, pool, targets, *extra, method="trim", model=None):
    argv = ["select", "--method", method, "--pool", str(pool), "--target", *map(str, targets), "--out", str(out)]
    argv += ["--no-progress", *extra]
    if method == "trim":
        argv += ["--model", str(model), "--warmup", "none", "--layers", "2"]
    assert main(argv) == 0
    return pq.read_table(out / "scores.parquet"), json.loads((out / "run.json").read_text())


@pytest.fixture()
def two_targets(small_pool, tmp_path):
    pool, math = small_pool
    other = write_jsonl(
        tmp_path / "other.jsonl",
        [
            chat(200, "Write a short poem about rivers.", "The river runs, the river sings.", "poems"),
            chat(201, "How do I make pancakes?", "Mix flour, eggs and milk, then fry.", "cooking"),
        ],
    )
    return pool, math, other


def _check_multi(table, info, singles, budget):
    cols = table.column_names
    assert cols[: len(BASE_COLUMNS)] == BASE_COLUMNS
    assert set(cols) == set(BASE_COLUMNS) | {"score_math", "score_other", "rank_math", "rank_other"}
    for name, single in singles.items():
        # each target's scores are exactly what a single-target run on it gives
        np.testing.assert_allclose(table.column(f"score_{name}").to_numpy(), single.column("score").to_numpy())
        assert table.column(f"rank_{name}").to_pylist() == single.column("rank").to_pylist()
    assert sum(table.column("selected").to_pylist()) == budget
    rank = table.column("rank").to_numpy()
    assert sorted(rank.tolist()) == list(range(1, table.num_rows + 1))
    t = info["targets"]
    assert t["names"] == ["math", "other"] and t["combine"] == "quota"
    assert t["quota"] == {"math": 0.5, "other": 0.5}
    assert set(t["coverage"]) == {"math", "other"} and set(t["overlap"]) == {"math|other"}
    # quota 2 + 2: each target's own top-2 lies in the coreset unless the other took one first
    assert all(c["k"] == 2 for c in t["coverage"].values())
    assert t["coverage"]["math"]["in_coreset"] == 2
    assert t["coverage"]["other"]["in_coreset"] >= 2 - t["overlap"]["math|other"]
    assert info["counts"]["selected"] == budget


def test_trim_two_named_targets_one_pass(tiny_model_dir, two_targets, tmp_path):
    pool, math, other = two_targets
    singles = {
        "math": _run(tmp_path / "m", pool, [math], "--budget", "4", model=tiny_model_dir)[0],
        "other": _run(tmp_path / "o", pool, [other], "--budget", "4", model=tiny_model_dir)[0],
    }
    out = tmp_path / "multi"
    table, info = _run(out, pool, [f"math={math}", f"other={other}"], "--budget", "4", model=tiny_model_dir)
    _check_multi(table, info, singles, 4)
    # one dictionary per target, saved per target; one forward pass per pool record
    assert (out / "fingerprints-math.safetensors").is_file() and (out / "fingerprints-other.safetensors").is_file()
    assert not (out / "fingerprints.safetensors").exists()
    assert info["cost"]["forward_passes"] == 4 + table.num_rows  # 2 + 2 target records, pool once
    assert set(info["stats"]["stage1"]["per_target"]) == {"math", "other"}
    # --resume restores both dictionaries instead of fitting again, and scores the same
    (out / "scores.parquet").unlink()
    shutil.rmtree(out / "shards")
    resumed, info2 = _run(
        out, pool, [f"math={math}", f"other={other}"], "--budget", "4", "--resume", model=tiny_model_dir
    )
    assert resumed.equals(table)
    assert info2["cost"]["forward_passes"] == table.num_rows  # no Stage I this time


def test_bm25_two_named_targets_natively(two_targets, tmp_path):
    pool, math, other = two_targets
    singles = {
        "math": _run(tmp_path / "m", pool, [math], "--budget", "4", method="bm25")[0],
        "other": _run(tmp_path / "o", pool, [other], "--budget", "4", method="bm25")[0],
    }
    table, info = _run(tmp_path / "multi", pool, [f"math={math}", f"other={other}"], "--budget", "4", method="bm25")
    _check_multi(table, info, singles, 4)


def test_single_target_method_two_named_targets_via_fallback(two_targets, tmp_path):
    """Random has no native multi-target fit: PerTarget fits it once per target (same seed, so
    the same draw), and each column equals a single-target run."""
    from coreselect.methods import registry

    assert not registry.get("random").cls.multi_target
    pool, math, other = two_targets
    singles = {
        "math": _run(tmp_path / "m", pool, [math], "--budget", "4", method="random")[0],
        "other": _run(tmp_path / "o", pool, [other], "--budget", "4", method="random")[0],
    }
    table, info = _run(tmp_path / "multi", pool, [f"math={math}", f"other={other}"], "--budget", "4", method="random")
    _check_multi(table, info, singles, 4)
    assert table.column("score_math").equals(table.column("score_other"))


@pytest.mark.parametrize("how", ["max", "mean", "round-robin"])
def test_other_combine_modes(two_targets, tmp_path, how):
    pool, math, other = two_targets
    table, info = _run(
        tmp_path / how, pool, [f"math={math}", f"other={other}"], "--budget", "3", "--combine", how, method="bm25"
    )
    assert info["targets"]["combine"] == how
    assert sum(table.column("selected").to_pylist()) == 3
    assert all(c["k"] == 3 for c in info["targets"]["coverage"].values())


def test_uneven_quota(two_targets, tmp_path):
    pool, math, other = two_targets
    table, info = _run(
        tmp_path / "q", pool, [f"math={math}", f"other={other}"], "--budget", "3", "--quota", "math=70%", method="bm25"
    )
    assert info["targets"]["quota"] == pytest.approx({"math": 0.7, "other": 0.3})
    assert {n: c["k"] for n, c in info["targets"]["coverage"].items()} == {"math": 2, "other": 1}
    assert sum(table.column("selected").to_pylist()) == 3


def test_single_unnamed_target_output_unchanged(tiny_model_dir, small_pool, tmp_path):
    """One unnamed target: the same columns as ever, no per-target keys, and a lone ``target=``
    name is the same run."""
    pool, target = small_pool
    a, info = _run(tmp_path / "a", pool, [target], "--budget", "3", model=tiny_model_dir)
    b, _ = _run(tmp_path / "b", pool, [f"target={target}"], "--budget", "3", model=tiny_model_dir)
    assert a.column_names == BASE_COLUMNS
    assert "targets" not in info
    assert (tmp_path / "a" / "fingerprints.safetensors").is_file()
    assert a.equals(b)
    assert (tmp_path / "a" / "coreset.jsonl").read_bytes() == (tmp_path / "b" / "coreset.jsonl").read_bytes()


def test_target_sets_from_cli_and_yaml(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [])
    b = write_jsonl(tmp_path / "b.jsonl", [])
    args = SelectArgs(target=[f"csqa={a}", f"siqa={b}"])
    assert args.target_sets() == {"csqa": [str(a)], "siqa": [str(b)]}
    yaml_like = args_from_dict(SelectArgs, {"target": {"csqa": str(a), "siqa": [str(b), str(a)]}})
    assert yaml_like.target_sets() == {"csqa": [str(a)], "siqa": [str(b), str(a)]}
    assert SelectArgs(target=[str(a), str(b)]).target_sets() == {"target": [str(a), str(b)]}
    with pytest.raises(ConfigError, match="mix"):
        SelectArgs(target=[f"csqa={a}", str(b)]).target_sets()
    bad = SelectArgs(pool=[str(a)], out=str(tmp_path / "o"), method="bm25", target=[f"x={a}", f"y={b}"], combine="min")
    with pytest.raises(ConfigError, match="combine"):
        bad.validate()
