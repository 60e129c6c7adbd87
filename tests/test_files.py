"""collector.files: the modes of what the collector creates, and the spreadsheet formula guard."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.files import (
    create_private_file,
    create_temp_file,
    dir_mode,
    ensure_private_dir,
    file_mode,
    guard_formula,
    guard_row,
)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The common umask 022, under which files would otherwise be world-readable."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    """The permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


def test_modes_are_owner_only_unless_shared() -> None:
    """0600/0700 by default, 0640/0750 with shared_group."""
    assert (file_mode(False), dir_mode(False)) == (0o600, 0o700)
    assert (file_mode(True), dir_mode(True)) == (0o640, 0o750)


def test_ensure_private_dir_creates_missing_directories_only(
    tmp_path: Path, loose_umask: None
) -> None:
    """Missing directories (parents included) get the mode and are returned; existing ones keep
    theirs."""
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)  # noqa: S103 - an operator's own directory, which must stay so
    target = existing / "a" / "b"
    assert ensure_private_dir(target) == [existing / "a", target]
    assert (mode(existing), mode(existing / "a"), mode(target)) == (0o755, 0o700, 0o700)
    assert ensure_private_dir(target) == []
    shared = tmp_path / "shared"
    assert ensure_private_dir(shared, shared_group=True) == [shared]
    assert mode(shared) == 0o750


def test_ensure_private_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    """A regular file where a directory belongs is an OSError, not silently accepted."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file"):
        ensure_private_dir(tmp_path / "file" / "sub")


def test_create_private_file_creates_once_and_never_touches_an_existing_file(
    tmp_path: Path, loose_umask: None
) -> None:
    """A new file is empty with the mode; an existing one keeps its content and mode."""
    path = tmp_path / "state.db"
    assert create_private_file(path) is True
    assert (mode(path), path.read_bytes()) == (0o600, b"")
    path.write_bytes(b"data")
    os.chmod(path, 0o644)
    assert create_private_file(path, shared_group=True) is False
    assert (mode(path), path.read_bytes()) == (0o644, b"data")
    assert create_private_file(tmp_path / "shared.db", shared_group=True) is True
    assert mode(tmp_path / "shared.db") == 0o640


def test_create_temp_file_has_the_mode(tmp_path: Path, loose_umask: None) -> None:
    """A temporary file is hidden-named as asked and has the shared mode when shared."""
    fd, name = create_temp_file(tmp_path, ".x.csv.", shared_group=True)
    os.close(fd)
    path = Path(name)
    assert path.name.startswith(".x.csv.")
    assert path.name.endswith(".tmp")
    assert mode(path) == 0o640


@pytest.mark.parametrize(
    "cell",
    ['=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3+cmd", "\t=1+1", "\r=1"],
)
def test_formula_cells_get_a_leading_quote(cell: str) -> None:
    """Every OWASP trigger character at the start makes the cell text; guarding twice is a no-op."""
    assert guard_formula(cell) == "'" + cell
    assert guard_formula(guard_formula(cell)) == "'" + cell


@pytest.mark.parametrize("cell", ["ada@example.com", "VS Code", "C#", "2025-01-31", "", " =x"])
def test_other_cells_are_unchanged(cell: str) -> None:
    """Text that does not start with a trigger is left exactly as it is."""
    assert guard_formula(cell) == cell


def test_guard_row_leaves_numbers_and_other_values() -> None:
    """Only str cells are guarded: ints, floats, booleans, None and lists stay as they are."""
    row = ["-1", -1, -2.5, True, None, ["=x"], "=x"]
    assert guard_row(row) == ["'-1", -1, -2.5, True, None, ["=x"], "'=x"]
