"""``select`` killed with SIGKILL at several moments, then ``--resume``: same outputs as one run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import chat, write_jsonl

from coreselect.__main__ import main

# Runs `coreselect select` in a subprocess, slowed down so a kill lands where we want it:
# every parquet write sleeps after writing its temp file and before the rename, so a kill
# during that sleep leaves a stale `.scores-NNNNN.parquet.XXXX.tmp` behind.
SLOW_MAIN = """
import sys, time
import pyarrow.parquet as pq
_write = pq.write_table
def slow_write(*a, **k):
    _write(*a, **k)
    time.sleep(float(sys.argv[1]))
pq.write_table = slow_write
from coreselect.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pool(tmp_path: Path) -> tuple[Path, Path]:
    words = ["apples", "boxes", "eggs", "the sea", "bread", "French", "Friday", "scissors", "a fox", "clips"]
    rows = []
    for i in range(60):
        w = words[i % len(words)]
        user = f"Question {i}: what about {w}?" + " Please explain." * (i % 4)
        rows.append(
            chat(i, user, f"{i} + {i % 7} = {i + i % 7}. It is about {w}." * (1 + i % 3), "math" if i % 3 else "other")
        )
    target = [chat(100, "What is 12 plus 30?", "10 + 30 = 40, plus 2 is 42. The answer is 42.", "gsm8k")]
    return write_jsonl(tmp_path / "pool.jsonl", rows), write_jsonl(tmp_path / "target.jsonl", target)


def _argv(model: Path, pool: Path, target: Path, out: Path, *extra: str) -> list[str]:
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
        "5",
        "--batch-tokens",
        "64",
        "--budget",
        "7",
        "--no-progress",
        *extra,
    ]


def _shards(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("scores-*.parquet")) if (out / "shards").exists() else []


def _run_and_kill(
    argv: list[str], out: Path, when, *, slow: bool = True, delay: float = 0.25, timeout: float = 180
) -> None:
    """Start ``coreselect select`` in a subprocess, SIGKILL it as soon as ``when(out)`` holds."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = ["-c", SLOW_MAIN, str(delay)] if slow else ["-m", "coreselect"]
    proc = subprocess.Popen([sys.executable, *cmd, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t_end = time.monotonic() + timeout
    try:
        while not when(out):
            if proc.poll() is not None:
                pytest.fail(
                    f"run ended (rc={proc.returncode}) before the kill point: {proc.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() > t_end:
                pytest.fail("kill point not reached in time")
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    for p in _shards(out):  # whatever was complete before the kill is a whole, readable shard
        assert pq.read_table(p).num_rows == 5


def _tmp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_sigkill_at_several_moments_then_resume_equals_one_run(tiny_model_dir, tmp_path, capsys):
    pool, target = _pool(tmp_path)
    ref = tmp_path / "ref"
    assert main(_argv(tiny_model_dir, pool, target, ref)) == 0
    assert len(_shards(ref)) == 12

    out = tmp_path / "killed"
    argv = _argv(tiny_model_dir, pool, target, out)
    # 1. after the first shard is in place, while the second one is being written
    _run_and_kill(argv, out, lambda o: len(_shards(o)) >= 1 and any((o / "shards").glob(".*.tmp")))
    assert 1 <= len(_shards(out)) < 12 and not (out / "scores.parquet").exists()
    assert _tmp_files(out)  # the kill left a temp file behind
    # 2. a plain (not slowed) `python -m coreselect select --resume`, killed mid-way
    _run_and_kill([*argv, "--resume"], out, lambda o: len(_shards(o)) >= 5, slow=False)
    # 3. a resumed run killed while writing scores.parquet (every shard done)
    _run_and_kill([*argv, "--resume"], out, lambda o: any(o.glob(".scores.parquet.*.tmp")))
    assert len(_shards(out)) == 12 and not (out / "coreset.jsonl").exists()
    # 4. the final resume (in-process)
    assert main([*argv, "--resume"]) == 0

    assert not _tmp_files(out)
    assert pq.read_table(out / "scores.parquet").equals(pq.read_table(ref / "scores.parquet"))
    assert (out / "coreset.jsonl").read_text() == (ref / "coreset.jsonl").read_text()
    for a, b in zip(_shards(out), _shards(ref), strict=True):
        assert pq.read_table(a).equals(pq.read_table(b))

    # resuming with another shard size must not mix shards of two layouts
    capsys.readouterr()
    assert main([*argv[:-1], "--shard-records", "7", "--no-progress", "--resume"]) == 2
    assert "--shard-records changed" in capsys.readouterr().err
