"""One collector per SQLite state database: an exclusive lock file beside it, ``STATE.lock``.

``run`` (the daemon and ``--once``) and ``backfill`` fetch and write; two of them on one state
database would make every API request twice. The first takes :func:`fcntl.flock` on the lock file
and writes who it is (pid, host, start time) into it; the second finds the lock taken and refuses
to start, naming the first. The operating system releases a ``flock`` when its holder exits in any
way, ``kill -9`` included, so a lock is never stale: the file stays, its lock does not.
(``status`` and ``replay`` do not take the lock: they are meant to run next to a daemon.)

The lock file also remembers that the database was created: ``initialized: true`` once the schema
exists. A state file of zero bytes is what SQLite makes of a missing database, so it is accepted
on a first start (``touch state.db``), but once the lock file says the database was initialized, a
zero-byte state file means it was truncated (a full disk, a bad restore) and is refused instead of
being silently re-created empty, which would fetch the whole lookback window again and deliver it
as new.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from collector.errors import StoreError
from collector.files import create_private_file


class StoreUnusable(StoreError):
    """The state database cannot be used as it is (corrupt, emptied, or held by another
    collector): retrying cannot help, so commands and the daemon stop with this message."""


def lock_path(database: Path) -> Path:
    """The lock file of the SQLite database at ``database``: the same name plus ``.lock``."""
    return database.with_name(database.name + ".lock")


def _read_owner(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        if isinstance(data, dict):
            return data
    return {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner.get("pid"):
        return "another collector (it has not written its name yet)"
    return (
        f"another collector: pid {owner.get('pid')} on host {owner.get('host', '?')}, "
        f"started {owner.get('started', '?')}"
    )


def refuse_truncated(database: Path) -> None:
    """Raise :class:`StoreUnusable` if ``database`` is a zero-byte file the lock file says was
    a real database before (see the module docstring)."""
    try:
        size = database.stat().st_size
    except FileNotFoundError:
        return
    if size == 0 and _read_owner(lock_path(database)).get("initialized"):
        raise StoreUnusable(
            f"state database {database} is empty (0 bytes) but held data before "
            f"({lock_path(database)} says it was initialized): it was truncated. Restore it from "
            f"a backup; to start over with an empty state on purpose, delete both files"
        )


class StateLock:
    """The held lock; :meth:`release` (or process exit) gives it up."""

    def __init__(self, path: Path, fd: int, started: str) -> None:
        self.path = path
        self._fd: int | None = fd
        self._started = started

    @classmethod
    def acquire(cls, database: Path, *, shared_group: bool = False) -> StateLock:
        """Take the lock of ``database`` or raise :class:`StoreUnusable` naming its holder."""
        path = lock_path(database)
        try:
            create_private_file(path, shared_group)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreUnusable(
                f"state database {database} is in use by {_describe(_read_owner(path))}; "
                "one collector per state database (stop it first, or give this one its own "
                "state.url)"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return cls(path, fd, started)

    def record(self, *, initialized: bool) -> None:
        """Write the holder's pid, host and start time (and whether the schema exists)."""
        if self._fd is None:
            return
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self._started,
            "initialized": initialized or bool(_read_owner(self.path).get("initialized")),
        }
        data = (json.dumps(owner) + "\n").encode()
        # The lock is on the open file, not its content: rewriting it in place keeps the lock.
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Give the lock up (the file and its record stay: the record is the init marker)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
