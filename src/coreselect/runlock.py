"""One run per output folder: an exclusive, advisory lock held for the run's lifetime.

Two ``select`` runs started into the same ``--out`` would otherwise both succeed, each
writing shards and outputs into the other's folder. :class:`RunLock` takes an
``fcntl.flock`` on ``OUT/.coreselect.lock`` (``.coreselect-shard-I.lock`` for one of several
``--num-shards`` processes, which share a folder by design).

Why flock: the kernel releases it when the holder dies, however it dies (SIGKILL, OOM), so
a live lock is never mistaken for a stale one. The file's *content* records the holder
(pid, host, start time, command line) and is emptied on a clean exit, so a non-empty file
whose flock is free is the mark of a killed run: it is taken over under ``--resume`` or
``--overwrite`` and refused otherwise. The file is never unlinked while locked (unlinking
would let a third process lock a fresh inode beside the held one).

flock is not reliable on some network file systems (old NFS); run shard processes of one
job on one host per folder, or give each host its own ``--out``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from coreselect.errors import CoreselectError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; typing only, so no runtime dependency

LOCK_NAME = ".coreselect.lock"


def lock_name(shard_index: int | None = None) -> str:
    """The lock file's name: one per folder, or one per shard process of a sharded run."""
    return LOCK_NAME if shard_index is None else f".coreselect-shard-{shard_index}.lock"


def is_lock_file(path: Path) -> bool:
    """True for the lock files :class:`RunLock` leaves in a folder (they are not outputs)."""
    return path.name.startswith(".coreselect") and path.name.endswith(".lock")


class RunLock:
    """Hold ``OUT/.coreselect.lock`` exclusively for a ``with`` block.

    Args:
        out_dir: the run's output folder (created if missing).
        shard_index: for a ``--num-shards`` process, its index (each shard locks its own file).
        takeover: take over a lock left by a killed run (``--resume`` / ``--overwrite``);
            without it such a lock is refused with a one-line error.

    Raises:
        CoreselectError: another live run holds the folder (the message names its pid), or a
            killed run left its lock and ``takeover`` is False.
    """

    def __init__(
        self, out_dir: str | os.PathLike[str], shard_index: int | None = None, *, takeover: bool = False
    ) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / lock_name(shard_index)
        self.takeover = takeover
        self.previous: dict[str, Any] | None = None  # the killed run's record, when taken over
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # umask applies, like every output
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise CoreselectError(
                f"{self.out_dir}: in use by another coreselect run ({holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        stale = _read(fd)
        if stale is not None and not self.takeover:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise CoreselectError(
                f"{self.out_dir}: a run that was killed ({_describe(stale)}) left it; "
                "use --resume to continue it or --overwrite to start again"
            )
        self.previous = stale
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # empty = released cleanly (a killed run leaves its record)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _read(fd: int) -> dict[str, Any] | None:
    """The holder record in a lock file, or None when it is empty (released cleanly)."""
    raw = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
    if not raw:
        return None
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError:
        return {"pid": "?", "note": "unreadable lock record"}
    return rec if isinstance(rec, dict) else {"pid": "?"}


def _describe(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "pid unknown"
    where = f" on {rec['host']}" if rec.get("host") else ""
    since = f", started {rec['started']}" if rec.get("started") else ""
    return f"pid {rec.get('pid', '?')}{where}{since}"
