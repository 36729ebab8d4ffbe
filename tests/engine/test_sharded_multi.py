"""Several named targets over ``--num-shards N`` processes + ``coreselect merge`` == one ``select`` run."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import chat, write_jsonl

from coreselect.__main__ import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def multi_pool(tmp_path):
    rows = [
        chat(i, f"Question {i}: what is {i} plus {i % 5}?" + " Why?" * (i % 3), f"{i} + {i % 5} = {i + i % 5}.")
        for i in range(11)
    ] + [chat(50 + i, f"Write a poem about the sea, part {i}.", "The sea is wide, the sea is deep.") for i in range(6)]
    math = [chat(100, "What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42. The answer is 42.", "gsm8k")]
    poem = [
        chat(200, "Write a short poem about rivers.", "The river runs, the river sings.", "poems"),
        chat(201, "Write a poem about the wind.", "The wind is cold, the wind is old.", "poems"),
    ]
    return (
        write_jsonl(tmp_path / "pool.jsonl", rows),
        write_jsonl(tmp_path / "math.jsonl", math),
        write_jsonl(tmp_path / "poem.jsonl", poem),
    )


def _argv(model, pool, targets, out, *extra):
    argv = ["select", "--model", str(model), "--pool", str(pool), "--target", *targets, "--out", str(out)]
    argv += ["--warmup", "none", "--layers", "2", "--shard-records", "4", "--budget", "6", "--no-progress"]
    return [*argv, *extra]


def test_named_targets_sharded_then_merge_equal_one_run(tiny_model_dir, multi_pool, tmp_path):
    pool, math, poem = multi_pool
    targets = [f"math={math}", f"poem={poem}"]
    ref = tmp_path / "ref"
    assert main(_argv(tiny_model_dir, pool, targets, ref)) == 0
    out = tmp_path / "sharded"
    for i in (1, 0):
        assert main(_argv(tiny_model_dir, pool, targets, out, "--num-shards", "2", "--shard-index", str(i))) == 0
        assert not (out / "scores.parquet").exists()
    assert (out / "fingerprints-math.safetensors").is_file() and (out / "fingerprints-poem.safetensors").is_file()
    shard = pq.read_table(out / "shards" / "scores-00000.parquet")
    assert {"score_math", "score_poem"} <= set(shard.column_names)
    assert main(["merge", "--out", str(out), "--pool", str(pool), "--budget", "6"]) == 0
    got, want = pq.read_table(out / "scores.parquet"), pq.read_table(ref / "scores.parquet")
    assert got.column_names == want.column_names and "rank_poem" in got.column_names
    assert got.equals(want)
    assert (out / "coreset.jsonl").read_text() == (ref / "coreset.jsonl").read_text()
    run, ref_run = json.loads((out / "run.json").read_text()), json.loads((ref / "run.json").read_text())
    assert run["targets"] == ref_run["targets"]  # names, combine, quota, coverage, overlap, sizes
    assert run["targets"]["sizes"] == {"math": 1, "poem": 2}

    # merge can re-combine without rescoring: --combine max == a select run with --combine max
    assert main(_argv(tiny_model_dir, pool, targets, tmp_path / "ref-max", "--combine", "max")) == 0
    assert main(["merge", "--out", str(out), "--pool", str(pool), "--budget", "6", "--combine", "max"]) == 0
    assert pq.read_table(out / "scores.parquet").equals(pq.read_table(tmp_path / "ref-max" / "scores.parquet"))
    assert json.loads((out / "run.json").read_text())["targets"]["combine"] == "max"


def test_merge_refusals(tiny_model_dir, multi_pool, tmp_path, capsys):
    pool, math, poem = multi_pool
    single = tmp_path / "single"
    assert main(_argv(tiny_model_dir, pool, [str(math)], single, "--num-shards", "2", "--shard-index", "0")) == 0
    assert main(_argv(tiny_model_dir, pool, [str(math)], single, "--num-shards", "2", "--shard-index", "1")) == 0
    assert main(["merge", "--out", str(single), "--pool", str(pool), "--combine", "max"]) == 2
    assert "several named targets" in capsys.readouterr().err
    assert main(["merge", "--out", str(single), "--pool", str(pool), "--combine", "best"]) == 2
    assert "--combine must be one of" in capsys.readouterr().err
    # shards of a one-target run and of a two-target run do not merge
    multi = tmp_path / "multi"
    targets = [f"math={math}", f"poem={poem}"]
    assert main(_argv(tiny_model_dir, pool, targets, multi, "--num-shards", "2", "--shard-index", "0")) == 0
    shutil.copy(single / "shards" / "scores-00001.parquet", multi / "shards" / "scores-00001.parquet")
    assert main(["merge", "--out", str(tmp_path / "m"), "--inputs", str(multi), "--pool", str(pool)]) == 2
    assert "scored for different targets" in capsys.readouterr().err
