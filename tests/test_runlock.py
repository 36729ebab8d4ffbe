"""One run per output folder: RunLock between real processes, and select() honouring it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import coreselect
from coreselect.errors import CoreselectError
from coreselect.runlock import LOCK_NAME, RunLock

# A second process that takes the lock, says so, and holds it until killed.
HOLDER = """
import sys, time
from coreselect.runlock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _start_holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _select(pool: Path, target: Path, out: Path, **kw) -> dict:
    settings = {"method": "bm25", "budget": "2", "progress": False, **kw}
    return coreselect.select(pool=[str(pool)], target=[str(target)], out=str(out), **settings)


def test_second_run_names_the_holder_pid(small_pool, tmp_path):
    pool, target = small_pool
    out = tmp_path / "run"
    holder = _start_holder(out)
    try:
        with pytest.raises(CoreselectError, match=rf"in use by another coreselect run \(pid {holder.pid}\b"):
            _select(pool, target, out)
        # nothing of the refused run was written next to the holder's lock
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_run_is_refused_then_taken_over_with_resume(small_pool, tmp_path):
    pool, target = small_pool
    out = tmp_path / "run"
    holder = _start_holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["pid"] == holder.pid  # the killed run's record survives it
    with pytest.raises(CoreselectError, match=rf"killed \(pid {holder.pid}\b.*--resume"):
        _select(pool, target, out)
    info = _select(pool, target, out, resume=True)
    assert info["counts"]["selected"] == 2
    assert (out / LOCK_NAME).read_text() == ""  # released cleanly: empty, not a stale record


def test_clean_exit_releases_and_a_new_run_may_follow(tmp_path):
    out = tmp_path / "run"
    with RunLock(out) as lock:
        assert lock.previous is None
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    with RunLock(out) as again:  # no takeover needed after a clean exit
        assert again.previous is None


def test_shard_processes_lock_separately(tmp_path):
    with (
        RunLock(tmp_path, 0),
        RunLock(tmp_path, 1),
        pytest.raises(CoreselectError, match="in use"),
        RunLock(tmp_path, 0),
    ):  # the second lock on shard 0 is the one refused
        pass


def test_lock_file_respects_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with RunLock(tmp_path / "run"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "run" / LOCK_NAME).stat().st_mode & 0o777 == 0o640


def test_failed_run_leaves_folder_reusable(small_pool, tmp_path):
    pool, target = small_pool
    out = tmp_path / "run"
    with pytest.raises(CoreselectError, match="larger than the pool"):
        _select(pool, target, out, budget="100000")  # fails once the pool is read, inside the lock
    assert (out / LOCK_NAME).read_text() == ""  # released by the context manager, in this live process
    assert _select(pool, target, out)["counts"]["selected"] == 2
