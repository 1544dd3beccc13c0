"""Where an Orbax checkpoint is: a directory with Orbax's markers, an item inside one, a
`CheckpointManager` root of step directories, or an unfinished save (refused).

Detection looks for these markers itself: Orbax's `is_orbax_checkpoint` also says yes
to an empty directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from bridge.errors import FormatError

TMP_SUFFIX = ".orbax-checkpoint-tmp"
"""What Orbax appends to a checkpoint's name while saving it (its `TMP_DIR_SUFFIX`)."""
STEP_METADATA = "_CHECKPOINT_METADATA"
TREE_FILES = ("_METADATA", "manifest.ocdbt")
STEP_NAME = re.compile(r"(?:.+_)?(\d+)")
"""Step directory names a CheckpointManager writes: `12`, `step_12`, `checkpoint_00012`."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: the directory holding its step metadata, and its PyTree items by
    name ("" for the only one)."""

    directory: Path
    items: dict[str, Path]


def _is_unfinished(path: Path) -> bool:
    return TMP_SUFFIX in path.name


def _is_tree(path: Path) -> bool:
    """An Orbax PyTree item: tree metadata, an OCDBT store, or per-array zarr directories."""
    if not path.is_dir() or _is_unfinished(path):
        return False
    if any((path / name).exists() for name in TREE_FILES):
        return True
    return any(
        child.name.startswith("ocdbt.process_")
        or (child / ".zarray").is_file()
        or (child / "zarr.json").is_file()
        for child in path.iterdir()
        if child.is_dir()
    )


def _checkpoint_in(path: Path) -> Checkpoint | None:
    """The checkpoint at `path` itself (not a manager root), if any."""
    if _is_tree(path):
        return Checkpoint(path, {"": path})
    items = {child.name: child for child in sorted(path.iterdir()) if _is_tree(child)}
    if len(items) == 1:
        return Checkpoint(path, {"": next(iter(items.values()))})
    if items:
        return Checkpoint(path, items)
    if (path / STEP_METADATA).is_file():
        names = sorted(child.name for child in path.iterdir() if child.is_dir())
        raise FormatError(
            f"{path}: an Orbax checkpoint without a PyTree item (its items: {names or 'none'}); "
            "bridge reads PyTrees of arrays"
        )
    return None


def _steps(root: Path) -> tuple[dict[int, Path], list[str]]:
    """A manager root's finished steps, and the names of its unfinished step directories."""
    finished: dict[int, Path] = {}
    unfinished: list[str] = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        if _is_unfinished(child):
            if STEP_NAME.fullmatch(child.name.split(TMP_SUFFIX)[0]):
                unfinished.append(child.name)
            continue
        number = STEP_NAME.fullmatch(child.name)
        if number and (
            (child / STEP_METADATA).is_file()
            or _is_tree(child)
            or any(_is_tree(item) for item in child.iterdir())
        ):
            finished[int(number.group(1))] = child
    return finished, unfinished


def _unfinished(path: Path) -> FormatError:
    return FormatError(
        f"{path}: an unfinished save (Orbax writes into '*{TMP_SUFFIX}*' and renames it when "
        "done): the save is still running or was interrupted; load a finished checkpoint"
    )


def locate(path: Path, step: Any) -> Checkpoint:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise FormatError(f"step={step!r}: expected an int, the number of a saved step")
    if _is_unfinished(path):
        raise _unfinished(path)
    if not path.is_dir():
        raise FormatError(
            f"{path}: {'not a directory' if path.exists() else 'no such directory'}; "
            "an Orbax checkpoint is a directory"
        )
    checkpoint = _checkpoint_in(path)
    if checkpoint is not None:
        if step is not None:
            raise FormatError(
                f"{path}: step={step} picks a step of a CheckpointManager root, but this is "
                "a single checkpoint"
            )
        return checkpoint
    finished, unfinished = _steps(path)
    if not finished:
        if unfinished:
            raise FormatError(
                f"{path}: a CheckpointManager root whose only steps are unfinished saves "
                f"({', '.join(unfinished)}); the save is still running or was interrupted"
            )
        raise FormatError(
            f"{path}: not an Orbax checkpoint: no {' or '.join(TREE_FILES)}, no item directory "
            "holding one, no step directory"
        )
    chosen = max(finished) if step is None else step
    if chosen not in finished:
        pending = f"; unfinished: {', '.join(unfinished)}" if unfinished else ""
        raise FormatError(
            f"{path}: no finished step {step}; the CheckpointManager root has steps "
            f"{sorted(finished)}{pending}"
        )
    found = _checkpoint_in(finished[chosen])
    if found is None:
        raise FormatError(f"{finished[chosen]}: step {chosen} holds no Orbax PyTree item")
    return found


def detect(obj: Any) -> float:
    """Sure for a directory with Orbax's markers (a checkpoint, an item inside one, a
    manager root with step directories, an unfinished save); never raises."""
    if not isinstance(obj, str | os.PathLike):
        return 0.0
    try:
        path = Path(os.fspath(obj))
        if not path.is_dir():
            return 0.0
        if _is_unfinished(path) or (path / STEP_METADATA).is_file():
            return 1.0
        if _checkpoint_in(path) is not None:
            return 1.0
        finished, unfinished = _steps(path)
        return 1.0 if finished or unfinished else 0.0
    except (OSError, TypeError, ValueError):  # FormatError is a ValueError
        return 0.0
