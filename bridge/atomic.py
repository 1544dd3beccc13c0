"""Atomic outputs: what bridge writes appears complete or not at all, and nothing bridge
did not write is ever removed.

A save builds under temporary names beside its output, `.{output}.{token}.tmp`, flushes
them to disk and only then moves them into place. The process that makes a temporary
holds an `flock` on it for as long as the temporary lives, so a later save to the same
place tells a temporary left by a killed process (its lock is free: the kernel drops it
with the process, whatever became of the process id) from one in use, and sweeps only
the former. Where locks are not to be had (Windows, some network filesystems) nothing is
swept.

Moves replace nothing they must not. Without `overwrite`, an output that another writer
made between bridge's check and its move is kept: Linux's `renameat2(RENAME_NOREPLACE)`
refuses to replace it, as does a hard link elsewhere. With `overwrite`, a file is
replaced by `os.replace` and a directory is swapped for the new one in one step with
`renameat2(RENAME_EXCHANGE)`. Where neither call exists (another system, a filesystem
without them, a directory without hard links) a check then a rename stands in, and for a
directory the old one is renamed aside first: a short window.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from types import TracebackType

from bridge.errors import OutputExistsError

try:
    import fcntl
except ImportError:  # Windows: no flock, so no telling an abandoned temporary from one in use
    fcntl = None  # type: ignore[assignment]

TEMPORARY = re.compile(r"\.(?P<output>.+)\.[0-9a-f]{8}\.tmp")
"""The name of bridge's temporaries: `.{output}.{token}.tmp`, the token 8 hex digits."""
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
"""renameat2(2) flags (linux/fs.h)."""
_AT_FDCWD = -100
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def output_of(entry: str) -> str | None:
    """The output name a temporary named `entry` was made for; None for any other name."""
    match = TEMPORARY.fullmatch(entry)
    return match["output"] if match else None


class Temporary:
    """A new empty file (or directory) `.{output}.{token}.tmp` in `directory`, locked by
    this process until closed, and removed then unless moved away or `kept`."""

    def __init__(self, directory: Path, output: str, *, is_dir: bool = False) -> None:
        self.kept = False
        while True:
            self.path = directory / f".{output}.{secrets.token_hex(4)}.tmp"
            if is_dir:
                self.path.mkdir()
            else:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            with contextlib.suppress(FileNotFoundError):
                self._handle = os.open(self.path, os.O_RDONLY)
                _lock(self._handle, wait=True)
                if _names(self.path, self._handle):
                    return
                os.close(self._handle)
            # swept between its making and its locking: make another

    def close(self) -> None:
        if not self.kept and _names(self.path, self._handle):
            _remove(self.path)
        os.close(self._handle)

    def __enter__(self) -> Temporary:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def sweep(directory: Path, outputs: Callable[[str], bool], keep: Collection[str] = ()) -> None:
    """Remove the temporaries in `directory` made for an output that `outputs` accepts
    and whose owner is gone (their lock is free), except those named in `keep`. Nothing
    else is touched: no other name, no symbolic link, no temporary in use."""
    if fcntl is None:
        return
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        output = output_of(entry)
        if output is None or not outputs(output) or entry in keep:
            continue
        path = directory / entry
        try:
            handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # gone meanwhile, a symbolic link, unreadable
            continue
        try:
            mode = os.fstat(handle).st_mode
            plain = stat.S_ISREG(mode) or stat.S_ISDIR(mode)  # as bridge makes them
            if plain and _lock(handle, wait=False) and _names(path, handle):
                _remove(path)
        finally:
            os.close(handle)


def _lock(handle: int, *, wait: bool) -> bool:
    """Take the exclusive lock of an open temporary; without `wait`, not if another holds
    it. False where locks are not to be had (Windows, some network filesystems): then the
    owner goes unlocked, and no sweeper ever takes its temporary for abandoned."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:  # BlockingIOError: held by another
        return False
    return True


def _names(path: Path, handle: int) -> bool:
    """Whether `path` still names the file or directory open as `handle`."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle)
    return (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)


def check_output(path: str | os.PathLike[str], *, overwrite: bool, directory: bool = False) -> None:
    """Refuse, before any work, what a save at `path` must never do: replace an output
    without `overwrite`, turn a directory into a file or a file into a directory (overwrite
    or not), take the place of `.` or `..`, or put its output under a file.

    `directory` says the output is a directory; an empty directory counts as absent.
    """
    target = Path(path)
    exists = OutputExistsError(f"{target} exists; pass overwrite=True to replace it")
    if target.name in ("", ".."):  # "." and "" are Path("."), whose name is ""
        raise OutputExistsError(
            f"{os.fspath(path)!r} is a directory, not a name of the output's own; "
            f"give the output its own name, e.g. {os.path.join(path, 'output')!r}"
        )
    if target.is_dir():
        if not directory:
            raise OutputExistsError(
                f"{target} is a directory; a file output never replaces a directory"
            )
        if not overwrite and any(target.iterdir()):
            raise exists
    elif os.path.lexists(target):
        if directory:
            raise OutputExistsError(f"{target} is a file; a directory output never replaces a file")
        if not overwrite:
            raise exists
    _refuse_file_above(target)


def make_directory(path: Path) -> None:
    """Create directory `path` and its parents; a file where one of them goes is an
    `OutputExistsError`, not a raw OSError."""
    if os.path.lexists(path) and not path.is_dir():
        raise OutputExistsError(f"{path} is a file; a directory output never replaces a file")
    _refuse_file_above(path)
    path.mkdir(parents=True, exist_ok=True)


def _refuse_file_above(path: Path) -> None:
    for parent in path.parents:
        if parent.is_dir():
            return
        if os.path.lexists(parent):
            raise OutputExistsError(f"{parent} is a file; {path} cannot be made under it")


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, overwrite: bool = False, directory: bool = False
) -> Iterator[Path]:
    """Yield where to build the output: an absolute path, not existing yet, in a locked
    temporary directory beside `path`. Once the block ends, the output is flushed to disk
    and moved to `path`; if it raises, nothing is left behind.

    `check_output` applies, before the work and again before the move. Temporaries of
    earlier saves to `path` whose owner is gone are swept first.
    """
    target = Path(path)
    check_output(target, overwrite=overwrite, directory=directory)
    make_directory(target.parent)
    sweep(target.parent, lambda output: output == target.name)
    with Temporary(target.parent, target.name, is_dir=True) as work:
        built = work.path.absolute() / target.name
        yield built
        _fsync_tree(built)
        check_output(target, overwrite=overwrite, directory=directory)
        if not overwrite and _is_real_dir(target):  # empty, so it counts as absent
            _remove_empty_dir(target)
        move(built, target, replace=overwrite)
    fsync(target.parent)


def _remove_empty_dir(path: Path) -> None:
    try:
        os.rmdir(path)  # which refuses a directory that is no longer empty
    except OSError:
        raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it") from None


def move(src: Path, dst: Path, *, replace: bool) -> None:
    """Rename `src` to `dst`. Without `replace`, whatever is at `dst`, even if it appeared
    a moment ago, is kept and `OutputExistsError` raised. With it, a file is replaced, and
    an existing directory is swapped for `src` (the old one is left inside `src`'s
    directory, for its caller to remove)."""
    if not replace:
        _move_new(src, dst)
    elif _is_real_dir(src) and os.path.lexists(dst):
        _swap(src, dst)
    else:
        os.replace(src, dst)


def _move_new(src: Path, dst: Path) -> None:
    exists = OutputExistsError(f"{dst} exists (it appeared while saving); pass overwrite=True")
    try:
        if _renameat2(src, dst, RENAME_NOREPLACE) or _link_then_unlink(src, dst):
            return
    except FileExistsError:
        raise exists from None
    if os.path.lexists(dst):  # no atomic way here: a check, then a rename
        raise exists
    os.rename(src, dst)


def _link_then_unlink(src: Path, dst: Path) -> bool:
    """Move file `src` to `dst` by a hard link, which never replaces `dst`; False where
    hard links are not to be had (a directory, some filesystems)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        return False
    os.unlink(src)
    return True


def _swap(new: Path, old: Path) -> None:
    """Directory `new` takes the place of `old` in one step where renameat2 can do it;
    otherwise `old` is renamed aside first, and put back if `new` cannot take its place."""
    if _renameat2(new, old, RENAME_EXCHANGE):
        return
    aside = new.with_name(f"{new.name}.old")
    os.rename(old, aside)
    try:
        os.rename(new, old)
    except BaseException:
        os.rename(aside, old)
        raise


def _renameat2(src: Path, dst: Path, flag: int) -> bool:
    """Linux's renameat2(2) with `flag`; False where libc or the filesystem lacks it."""
    function = getattr(_LIBC, "renameat2", None)
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(src), None, os.fspath(dst))


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
                fsync(Path(parent, name))
    fsync(path)


def fsync(path: Path) -> None:
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
