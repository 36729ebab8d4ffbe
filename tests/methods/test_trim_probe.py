"""scripts/trim_probe.py: variant parsing, the top-share count, and one tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def probe():
    return load_script("trim_probe")


def test_parse_variant(probe):
    assert probe.parse_variant("paper:") == ("paper", {})
    assert probe.parse_variant("x:token_weighting=idf, min-tokens=64,w_max=0,oov_penalty=none") == (
        "x",
        {"token_weighting": "idf", "min_tokens": 64, "w_max": 0, "oov_penalty": None},
    )
    with pytest.raises(SystemExit):
        probe.parse_variant("x:w_max")


def test_top_share_and_spearman(probe):
    scores = [0.9, 0.1, 0.8, 0.8, float("-inf")]
    sources = ["math", "a", "b", "math", "math"]
    k, share, top = probe.top_share(scores, sources, {"math"}, 0.5)
    assert (k, top) == (3, [0, 2, 3]) and share == pytest.approx(2 / 3)  # tie 0.8: pool order
    assert probe.spearman(scores, scores) == pytest.approx(1.0)
    assert probe.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_probe_runs_end_to_end(probe, small_pool, tiny_model_dir, tmp_path, capsys, one_torch_thread):
    pool, target = small_pool
    out = tmp_path / "probe.jsonl"
    rc = probe.main(
        [
            "--pool",
            str(pool),
            "--target",
            str(target),
            "--own",
            "math",
            "--model",
            str(tiny_model_dir),
            "--max-length",
            "256",
            "--layers",
            "2",
            "--top",
            "0.5",
            "--variant",
            "paper:",
            "--variant",
            "idf_short:token_weighting=idf,min_tokens=8",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["paper", "idf_short"]
    assert all(r["k"] == 4 and 0 <= r["own_share"] <= 1 for r in rows)
    assert rows[0]["spearman_vs_paper"] == pytest.approx(1.0)
    assert "own share" in capsys.readouterr().out
