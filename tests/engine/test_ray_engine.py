"""``--engine ray`` on a local 2-CPU Ray cluster gives the local engine's scores."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import chat, write_jsonl

from coreselect.__main__ import main

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}
    )
    yield
    ray.shutdown()


def test_ray_engine_equals_local_engine(tiny_model_dir, tmp_path, local_ray, one_torch_thread):
    rows = [
        chat(
            i,
            f"Question {i}: what is {i} plus {i % 5}?" + " Why?" * (i % 3),
            f"{i} + {i % 5} = {i + i % 5}." * (1 + i % 2),
            "math" if i % 2 else "other",
        )
        for i in range(17)
    ]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    target = write_jsonl(
        tmp_path / "target.jsonl", [chat(100, "What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42.", "gsm8k")]
    )
    base = [
        "select",
        "--model",
        str(tiny_model_dir),
        "--pool",
        str(pool),
        "--target",
        str(target),
        "--warmup",
        "none",
        "--layers",
        "2",
        "--shard-records",
        "4",
        "--budget",
        "4",
        "--no-progress",
    ]
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    assert main([*base, "--out", str(tmp_path / "ray"), "--engine", "ray", "--ray-actors", "2"]) == 0
    a = pq.read_table(tmp_path / "local" / "scores.parquet")
    b = pq.read_table(tmp_path / "ray" / "scores.parquet")
    assert a.column_names == b.column_names and a.num_rows == b.num_rows == 17
    for col in ("index", "id", "source", "n_tokens", "n_scored"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist()
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), rtol=0, atol=1e-6)
    assert (tmp_path / "local" / "coreset.jsonl").read_text() == (tmp_path / "ray" / "coreset.jsonl").read_text()
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert run["engine"]["name"] == "ray" and run["engine"]["actors"] == 2


@pytest.mark.parametrize("method", ["trim", "rds"])  # TRIM natively, RDS through PerTarget
def test_ray_engine_several_named_targets(tiny_model_dir, tmp_path, local_ray, one_torch_thread, method):
    rows = [chat(i, f"Question {i}: what is {i} plus {i % 5}?", f"{i} + {i % 5} = {i + i % 5}.") for i in range(9)]
    rows += [
        chat(50 + i, f"Write a poem about the sea, part {i}.", "The sea is wide, the sea is deep.") for i in range(4)
    ]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    math = write_jsonl(tmp_path / "math.jsonl", [chat(100, "What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42.")])
    poem = write_jsonl(tmp_path / "poem.jsonl", [chat(200, "Write a poem about rivers.", "The river runs and sings.")])
    base = ["select", "--method", method, "--model", str(tiny_model_dir), "--pool", str(pool)]
    base += ["--target", f"math={math}", f"poem={poem}", "--warmup", "none", "--shard-records", "4", "--budget", "4"]
    base += ["--layers", "2", "--no-progress"] if method == "trim" else ["--no-progress"]
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    assert main([*base, "--out", str(tmp_path / "ray"), "--engine", "ray", "--ray-actors", "2"]) == 0
    a = pq.read_table(tmp_path / "local" / "scores.parquet")
    b = pq.read_table(tmp_path / "ray" / "scores.parquet")
    assert a.column_names == b.column_names and {"score_math", "score_poem", "rank_poem"} <= set(b.column_names)
    for col in ("score_math", "score_poem"):
        np.testing.assert_allclose(a.column(col).to_numpy(), b.column(col).to_numpy(), rtol=0, atol=1e-6)
    for col in ("index", "rank", "rank_math", "rank_poem", "selected"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist()
    assert (tmp_path / "local" / "coreset.jsonl").read_text() == (tmp_path / "ray" / "coreset.jsonl").read_text()
    local, ray_run = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("local", "ray"))
    assert ray_run["engine"]["name"] == "ray" and ray_run["targets"] == local["targets"]
