"""docs/adding-a-method.md shows examples/my_method.py verbatim, and that method runs end to end."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from conftest import chat, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("my_method", ROOT / "examples" / "my_method.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["my_method"] = module
    spec.loader.exec_module(module)  # registers "overlap"
    return module


def test_doc_shows_the_example_verbatim():
    doc = (ROOT / "docs" / "adding-a-method.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert (ROOT / "examples" / "my_method.py").read_text(encoding="utf-8") in blocks


def test_example_method_runs_select_and_saves_its_state(tmp_path):
    import coreselect
    from coreselect.methods import registry

    load_example()
    assert registry.get("overlap").streaming
    pool = write_jsonl(
        tmp_path / "pool.jsonl",
        [
            chat(0, "What is 7 plus 5?", "The answer is 12."),
            chat(1, "Write a poem about the sea.", "The sea is wide."),
            chat(2, "What is 40 plus 2?", "The answer is 42."),
            chat(3, "Hi", "Ok"),
        ],
    )
    target = write_jsonl(tmp_path / "target.jsonl", [chat(9, "What is 12 plus 30?", "The answer is 42.")])
    info = coreselect.select(
        pool=[str(pool)],
        target=[str(target)],
        out=str(tmp_path / "run"),
        method="overlap",
        budget="2",
        min_words=3,
        shard_records=2,
        progress=False,
    )
    table = pq.read_table(tmp_path / "run" / "scores.parquet").sort_by("index")
    scores = table.column("score").to_numpy()
    assert info["method_settings"] == {"scope": "all", "min_words": 3}
    assert scores[3] == -np.inf and scores[2] > scores[1]
    assert sorted(table.filter(table.column("selected")).column("index").to_pylist()) == [0, 2]
    assert (tmp_path / "run" / "overlap_vocab.json").is_file()


def test_example_method_keeps_the_contract(tmp_path):
    from methods.test_contract import test_method_keeps_the_contract

    load_example()
    test_method_keeps_the_contract("overlap", (None, []), "", tmp_path)
