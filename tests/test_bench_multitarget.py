"""bench/multitarget.py --smoke: the 1 vs 3 named-target benchmark runs end to end (not a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_multitarget_bench_smoke(tmp_path):
    out = tmp_path / "mt.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "multitarget.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "whole run 3 targets / 1 target:" in proc.stdout
    res = json.loads(out.read_text())
    assert [r["side"] for r in res["runs"]] == ["one", "three"]
    one, three = res["runs"]
    assert "targets" not in one
    assert three["targets"]["names"] == ["csqa", "siqa", "gsm8k"]
    assert set(three["targets"]["overlap"]) == {"csqa|siqa", "csqa|gsm8k", "siqa|gsm8k"}
    # one forward pass over the pool either way; the three-target run fits 3 x the target records
    assert three["forward_passes"] - one["forward_passes"] == 2 * res["targets"]["csqa"]
    assert res["one_target"] == "csqa" and res["target_tokens"]["three"] > res["target_tokens"]["one"] > 0
    assert set(res["ratios"]) == {"wall_s", "total_s", "fit_s", "score_s"}
    assert all(v > 0 for v in res["ratios"].values()) and len(res["pair_wall_ratios"]) == 1
