"""``--num-shards N --shard-index I`` processes + ``coreselect merge`` == one ``select`` run."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import chat, write_jsonl

from coreselect.__main__ import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def pool23(tmp_path):
    rows = [
        chat(
            i,
            f"Question {i}: what is {i} plus {i % 5}?" + " Why?" * (i % 3),
            f"{i} + {i % 5} = {i + i % 5}." * (1 + i % 2),
            "math" if i % 2 else "other",
        )
        for i in range(23)
    ]
    target = [chat(100, "What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42. The answer is 42.", "gsm8k")]
    return write_jsonl(tmp_path / "pool.jsonl", rows), write_jsonl(tmp_path / "target.jsonl", target)


def _argv(model, pool, target, out, *extra):
    return [
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
        "--shard-records",
        "4",
        "--budget",
        "5",
        "--no-progress",
        *extra,
    ]


def test_two_shard_processes_then_merge_equal_one_run(tiny_model_dir, pool23, tmp_path, capsys):
    pool, target = pool23
    ref = tmp_path / "ref"
    assert main(_argv(tiny_model_dir, pool, target, ref)) == 0

    # both shard processes share one folder (23 records / 4 = 6 chunks: 0,2,4 and 1,3,5)
    out = tmp_path / "sharded"
    for i in (1, 0):
        assert main(_argv(tiny_model_dir, pool, target, out, "--num-shards", "2", "--shard-index", str(i))) == 0
        assert not (out / "scores.parquet").exists() and not (out / "coreset.jsonl").exists()
        run = json.loads((out / f"run-shard-{i}.json").read_text())
        assert run["shard"]["chunks"] == [i, i + 2, i + 4]
    assert "run coreselect merge" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"scores-{j:05d}.parquet" for j in range(6)]
    # rerunning shard 0 without --resume/--overwrite is refused; with --resume it has nothing to do
    assert main(_argv(tiny_model_dir, pool, target, out, "--num-shards", "2", "--shard-index", "0")) == 2
    assert main(_argv(tiny_model_dir, pool, target, out, "--num-shards", "2", "--shard-index", "0", "--resume")) == 0
    assert json.loads((out / "run-shard-0.json").read_text())["counts"]["resumed_shards"] == 3

    assert main(["merge", "--out", str(out), "--pool", str(pool), "--budget", "5"]) == 0
    assert pq.read_table(out / "scores.parquet").equals(pq.read_table(ref / "scores.parquet"))
    assert (out / "coreset.jsonl").read_text() == (ref / "coreset.jsonl").read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "merge" and run["counts"]["selected"] == 5 and run["counts"]["shard_processes"] == 2


def test_merge_from_several_folders_checks_coverage(tiny_model_dir, pool23, tmp_path, capsys):
    pool, target = pool23
    a, b, m = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    assert main(_argv(tiny_model_dir, pool, target, a, "--num-shards", "2", "--shard-index", "0")) == 0
    merge = ["merge", "--out", str(m), "--pool", str(pool), "--budget", "5", "--inputs", str(a)]
    assert main(merge) == 2  # shard 1's chunks are missing
    assert "11 of 23 pool records have no score (first: index 4" in capsys.readouterr().err
    assert main(_argv(tiny_model_dir, pool, target, b, "--num-shards", "2", "--shard-index", "1")) == 0
    assert main([*merge, str(b)]) == 0
    assert pq.read_table(m / "scores.parquet").num_rows == 23
    assert len((m / "coreset.jsonl").read_text().splitlines()) == 5
    # the same chunk scored in two folders is an error, not a silent double count
    (b / "shards" / "scores-00000.parquet").write_bytes((a / "shards" / "scores-00000.parquet").read_bytes())
    assert main([*merge, str(b)]) == 2
    assert "index 0 is scored more than once" in capsys.readouterr().err


def test_bad_shard_settings_fail_early(tiny_model_dir, pool23, tmp_path, capsys):
    pool, target = pool23
    assert main(_argv(tiny_model_dir, pool, target, tmp_path / "x", "--num-shards", "2", "--shard-index", "2")) == 2
    assert "shard_index < num_shards" in capsys.readouterr().err
    assert main([*_argv(tiny_model_dir, pool, target, tmp_path / "y", "--num-shards", "2"), "--warmup", "auto"]) == 2
    assert "--warmup none or a saved adapter" in capsys.readouterr().err
    assert main(_argv(tiny_model_dir, pool, target, tmp_path / "z", "--engine", "spark")) == 2
    assert "engine must be local or ray" in capsys.readouterr().err
