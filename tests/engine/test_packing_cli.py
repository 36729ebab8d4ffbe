"""TRIM's opt-in sequence packing from the command line and YAML (issue 14 §2): ``--packing``
(a method option, so a flat flag like ``--layers``) scores like padded batching, in one
process and through ``--num-shards`` + ``merge``."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import chat, write_jsonl

from coreselect.__main__ import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def pool15(tmp_path):
    rows = [
        chat(
            i,
            f"Question {i}: what is {i} plus {i % 5}?" + " Why?" * (i % 4),
            f"{i} + {i % 5} = {i + i % 5}." * (1 + i % 3),
        )
        for i in range(15)
    ]
    target = [chat(100, "What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42. The answer is 42.", "gsm8k")]
    return write_jsonl(tmp_path / "pool.jsonl", rows), write_jsonl(tmp_path / "target.jsonl", target)


def _select(model, pool, target, out, *extra):
    argv = ["select", "--model", str(model), "--pool", str(pool), "--target", str(target), "--out", str(out)]
    argv += ["--warmup", "none", "--layers", "2", "--shard-records", "4", "--batch-tokens", "256", "--budget", "4"]
    assert main([*argv, "--no-progress", *extra]) == 0
    return pq.read_table(out / "scores.parquet") if (out / "scores.parquet").exists() else None


def _same_scores(a, b):
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), rtol=0, atol=1e-5)
    assert a.column("index").to_pylist() == b.column("index").to_pylist()


def test_packing_flag_and_yaml(tiny_model_dir, pool15, tmp_path, capsys):
    pool, target = pool15
    with pytest.raises(SystemExit):
        main(["select", "--method", "trim", "--help"])
    assert "--packing, --no-packing" in capsys.readouterr().out
    padded = _select(tiny_model_dir, pool, target, tmp_path / "padded")
    assert json.loads((tmp_path / "padded" / "run.json").read_text())["method_settings"]["packing"] is False
    packed = _select(tiny_model_dir, pool, target, tmp_path / "packed", "--packing")
    assert json.loads((tmp_path / "packed" / "run.json").read_text())["method_settings"]["packing"] is True
    _same_scores(packed, padded)
    # the same from a YAML config, and the flag overrides it
    cfg = tmp_path / "c.yaml"
    cfg.write_text("packing: true\n")
    from_yaml = _select(tiny_model_dir, pool, target, tmp_path / "yaml", "--config", str(cfg))
    assert json.loads((tmp_path / "yaml" / "run.json").read_text())["method_settings"]["packing"] is True
    assert from_yaml.equals(packed)
    _select(tiny_model_dir, pool, target, tmp_path / "yaml-off", "--config", str(cfg), "--no-packing")
    assert json.loads((tmp_path / "yaml-off" / "run.json").read_text())["method_settings"]["packing"] is False


def test_packing_sharded_then_merge(tiny_model_dir, pool15, tmp_path):
    pool, target = pool15
    ref = _select(tiny_model_dir, pool, target, tmp_path / "ref", "--packing")
    out = tmp_path / "sharded"
    for i in (0, 1):
        assert (
            _select(tiny_model_dir, pool, target, out, "--packing", "--num-shards", "2", "--shard-index", str(i))
            is None
        )
        assert json.loads((out / f"run-shard-{i}.json").read_text())["method_settings"]["packing"] is True
    assert main(["merge", "--out", str(out), "--pool", str(pool), "--budget", "4"]) == 0
    assert pq.read_table(out / "scores.parquet").equals(ref)
