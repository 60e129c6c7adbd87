"""What the collector's files are like at rest: private modes, and CSV cells safe in spreadsheets.

**Modes.** Files and directories the collector creates are owner-only unless shared with a group.

The state database, the SQLite sink, the CSV sink's partitions and ``export csv`` all hold
personal data (emails, unless a sink pseudonymizes or drops them), so whatever the collector
creates is private by default: files ``0600``, directories ``0700``, whatever the process's umask.
The one setting ``files.shared_group: true`` (:class:`collector.config.models.FilesConfig`) makes
them group-readable (``0640`` / ``0750``) for teams that share a data directory through a group.

Only what the collector *creates* gets these modes: a directory or file that already exists keeps
the mode its owner gave it (an operator's ``/var/lib/collector`` stays as it is). A file replaced by
a temporary file and a rename (the CSV sink, ``export``) is created anew each time, so it always
has the current mode.

**Spreadsheet formulas.** Every CSV the collector writes (the csv sink, the s3 sink's ``format:
csv``, ``export csv``, ``report --format csv``) holds text others chose: emails, IDE and language
names, tenant names. :func:`guard_formula` keeps a spreadsheet from running such a cell.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

_PRIVATE_FILE = 0o600
_SHARED_FILE = 0o640
_PRIVATE_DIR = 0o700
_SHARED_DIR = 0o750


def file_mode(shared_group: bool) -> int:
    """The mode of a file the collector creates: 0600, or 0640 when shared with the group."""
    return _SHARED_FILE if shared_group else _PRIVATE_FILE


def dir_mode(shared_group: bool) -> int:
    """The mode of a directory the collector creates: 0700, or 0750 when shared with the group."""
    return _SHARED_DIR if shared_group else _PRIVATE_DIR


def ensure_private_dir(path: str | Path, shared_group: bool = False) -> list[Path]:
    """Create ``path`` and its missing parents with :func:`dir_mode`; return those created.

    Existing directories are left as they are. The mode is set with ``chmod`` after ``mkdir``,
    so a umask that is stricter or looser than the mode changes nothing.
    """
    target = Path(path)
    missing: list[Path] = []
    current = target
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    created: list[Path] = []
    mode = dir_mode(shared_group)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            if directory.is_dir():  # another process or thread was faster: theirs stands
                continue
            raise
        os.chmod(directory, mode)
        created.append(directory)
    return created


def create_private_file(path: str | Path, shared_group: bool = False) -> bool:
    """Create ``path`` empty with :func:`file_mode` if it does not exist; True if it was created.

    For files a library creates on first use (a SQLite database): created here first, they get
    the right mode, and SQLite gives its ``-wal`` and ``-shm`` files the database file's mode.
    An existing file is left untouched (contents and mode).
    """
    mode = file_mode(shared_group)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    os.close(fd)
    # The mode given to open() is filtered by the umask; chmod sets it exactly.
    os.chmod(path, mode)
    return True


def create_temp_file(
    directory: str | Path, prefix: str, shared_group: bool = False
) -> tuple[int, str]:
    """A new temporary file in ``directory`` (``PREFIX…tmp``) with :func:`file_mode`.

    Returns the open file descriptor and the path, like :func:`tempfile.mkstemp`; the caller
    renames it into place or unlinks it.
    """
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        os.chmod(name, file_mode(shared_group))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    return fd, name


FORMULA_TRIGGERS: Final = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make Excel, LibreOffice or Google Sheets read a cell as a formula."""


def guard_formula(text: str) -> str:
    """``text`` with a leading ``'`` if a spreadsheet would run it as a formula, else unchanged.

    The OWASP rule against CSV injection: a cell such as ``=HYPERLINK("http://x","y")`` or
    ``@SUM(1+1)`` becomes ``'=HYPERLINK(...)``, which spreadsheets show as text. A guarded cell
    starts with ``'``, so guarding again changes nothing.
    """
    return "'" + text if text.startswith(FORMULA_TRIGGERS) else text


def guard_row(row: Sequence[Any]) -> list[Any]:
    """The cells of one CSV row, every text cell guarded (numbers and other values as they are)."""
    return [guard_formula(cell) if isinstance(cell, str) else cell for cell in row]


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable on return
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
