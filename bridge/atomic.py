"""Atomic outputs: build a file or directory under a temporary sibling name, move it into
place only once it is complete.

A crash or an exception half-way leaves the output path as it was (absent, or the old
output when overwriting) and no temporary behind. The temporary is a sibling, in the
same directory, so the final move is a rename within one filesystem.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from bridge.errors import OutputExistsError


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, overwrite: bool = False, directory: bool = False
) -> Iterator[Path]:
    """Yield a temporary path to build the output in; move it to `path` on success.

    With `directory=True` the temporary is an existing empty directory, otherwise a file
    name that does not exist yet. An existing `path` raises `OutputExistsError` before
    any work, unless `overwrite` (an empty directory counts as absent for a directory
    output). Missing parent directories are created. Written files are fsynced before
    the move, so the output is complete on disk once it has its final name.
    """
    target = Path(path)
    _refuse_existing(target, overwrite, directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    if directory:
        temp.mkdir()
    try:
        yield temp
        _fsync_tree(temp)
        _refuse_existing(target, overwrite, directory)  # it may have appeared meanwhile
        _move_into_place(temp, target)
    except BaseException:
        _remove(temp)
        raise
    _fsync(target.parent)


def _refuse_existing(target: Path, overwrite: bool, directory: bool) -> None:
    if overwrite or not os.path.lexists(target):
        return
    if directory and target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    raise OutputExistsError(f"{target} exists; pass overwrite=True to replace it")


def _move_into_place(temp: Path, target: Path) -> None:
    """`os.replace` where it is atomic (file over file); otherwise the old output is
    renamed aside first and restored if the new one cannot take its place."""
    if not os.path.lexists(target) or not (temp.is_dir() or _is_real_dir(target)):
        os.replace(temp, target)
        return
    aside = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
    os.rename(target, aside)
    try:
        os.rename(temp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove(aside)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if _is_real_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_tree(path: Path) -> None:
    if _is_real_dir(path):
        for parent, _, files in os.walk(path):
            for name in files:
                _fsync(Path(parent, name))
    _fsync(path)


def _fsync(path: Path) -> None:
    """Flush `path` (file or directory) to disk; platforms that cannot open a directory
    for syncing (Windows) skip that part."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
