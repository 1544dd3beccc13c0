"""Writing Orbax checkpoints: the tree Orbax saves, bridge's description of it, and the
save itself.

Both paths write the standard (v0) checkpoint `ocp.StandardCheckpointer` writes, read
back by `StandardCheckpointer().restore(path)` and by bridge without a template: from
memory with `StandardCheckpointer`; converting a file, in batches with Orbax's partial
save (`orbax.checkpoint.experimental.v1.partial`, the only Orbax API that saves one
checkpoint in several calls; "subject to change without notice"), whose v1 layout is
then turned into the v0 one (`_as_standard`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1
from etils import epath
from orbax.checkpoint.experimental.v1 import partial

from bridge import multihost
from bridge.errors import BridgeError, FormatError
from bridge.formats.orbax_locate import STEP_METADATA
from bridge.graph import Context
from bridge.progress import track
from bridge.stream import batches, release_freed_memory
from bridge.tree import (
    MESH,
    FlatState,
    Leaf,
    as_numpy,
    check_nestable,
    dotted,
    normalize_metadata,
    unflatten_mapping,
)
from bridge.tree import Path as TreePath

DESCRIPTION_KEY = "bridge"
"""The key of bridge's description in the checkpoint's custom metadata."""
COLLECTION_FIRST_SOURCES = frozenset({"linen", "msgpack"})
"""Sources whose users save `{collection: {...}}` trees; every other source is saved
module-first, the way NNX users save `nnx.state(model)`."""
UNSAFE_KEY_CHARACTERS = (".", "/")
"""Orbax joins keys with "." into array names, and "/" separates storage paths."""
LAYOUTS = ("module-first", "collection-first")
V1_ITEM, V1_MARKER, COMMIT_FILE, TREE_METADATA = (
    "state",
    "orbax.checkpoint",
    "commit_success.txt",
    "_METADATA",
)
PARTIAL_SAVE_FILES = frozenset({STEP_METADATA, COMMIT_FILE, V1_MARKER, V1_ITEM})
"""What a finished partial save holds at its root (`orbax...v1._src.partial.saving`)."""

Parts = tuple[str, ...]


def is_key_dtype(dtype: Any) -> bool:
    """Whether `dtype` is a typed PRNG key's (Orbax stores its key data instead)."""
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _to_json(value: Any) -> Any:
    """Metadata as JSON (tuples as lists); a TypeError for what JSON cannot hold."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _to_json(item) for key, item in value.items()}
    raise TypeError(type(value).__name__)


def _array(key: str, value: Any) -> Any:
    """What Orbax is given: jax arrays as they are (sharded ones are saved per shard),
    anything else as a numpy array."""
    value = multihost.as_array(value)
    if isinstance(value, jax.Array):
        return value
    array = as_numpy(key, value)
    if array.dtype.kind in "OUS":
        raise FormatError(f"{key!r}: Orbax stores numeric arrays, not dtype {array.dtype}")
    return array


def _check_keys(stored: list[tuple[Parts, tuple[Any, ...], str]]) -> None:
    """Refuse, before anything is written, the keys Orbax would store ambiguously.

    `stored` holds (key parts as saved, the leaf's own path, its dotted spelling).
    """
    by_name: dict[str, tuple[Any, ...]] = {}
    for parts, path, _ in stored:
        name = ".".join(parts)
        if name in by_name:
            raise FormatError(
                f"keys {by_name[name]} and {path} would both be stored as Orbax array {name!r}: "
                "Orbax joins nested keys with '.' and would restore one of the two arrays "
                "under both keys; rename one with rules=..."
            )
        by_name[name] = path
    for parts, _, key in stored:
        if any(char in part for part in parts for char in UNSAFE_KEY_CHARACTERS):
            raise FormatError(
                f"{key!r}: a key part holds '.' or '/', which Orbax uses to name and store "
                "arrays; it would be ambiguous in the checkpoint; rename it with rules=..."
            )
    check_nestable([parts for parts, _, _ in stored], "an Orbax checkpoint tree")


def _leaf_description(
    key: str, path: TreePath, leaf: Leaf, meshes: list[str], unstorable: list[str]
) -> dict[str, Any]:
    """What the saved tree loses of one leaf: kind, int key parts, metadata, PRNG-ness.
    Only what JSON holds is kept; the rest is listed in `meshes` / `unstorable`."""
    info: dict[str, Any] = {"kind": leaf.kind}
    if ints := [index for index, part in enumerate(path) if isinstance(part, int)]:
        info["ints"] = ints
    metadata = {}
    for name, value in normalize_metadata(leaf.metadata).items():
        if name == MESH:
            meshes.append(key)
            continue
        try:
            metadata[name] = _to_json(value)
        except TypeError as exc:
            unstorable.append(f"{key}: {name} ({exc})")
    if metadata:
        info["metadata"] = metadata
    if leaf.transient:
        info["transient"] = True
    if is_key_dtype(leaf.dtype):
        info["key"] = True
    return info


def _layout(
    flat: FlatState, ctx: Context, collection_first: bool
) -> tuple[dict[TreePath, tuple[Parts, str]], dict[str, Any]]:
    """Each leaf's key path in the saved tree and its dotted spelling, and the description
    of every leaf by array name; no array data is read."""
    stored: list[tuple[Parts, tuple[Any, ...], str]] = []
    leaves: dict[str, Any] = {}
    meshes: list[str] = []
    unstorable: list[str] = []
    for path, leaf in flat.items():
        if not path:
            raise FormatError("a leaf without a key cannot be stored in an Orbax tree")
        key = f"{leaf.kind or 'params'}/{dotted(path)}" if collection_first else dotted(path)
        if leaf.is_abstract:
            raise FormatError(f"{key!r} is abstract ({leaf.value}); it has no data to save")
        collection = (leaf.kind or "params",) if collection_first else ()
        parts = collection + tuple(map(str, path))
        stored.append((parts, collection + path, key))
        leaves[".".join(parts)] = _leaf_description(key, path, leaf, meshes, unstorable)
    _check_keys(stored)
    if meshes:
        ctx.report.notes.append(
            f"{len(meshes)} leaves' mesh not stored (a jax Mesh is no JSON; restore onto a mesh "
            f"with a template that has shardings): {', '.join(meshes)}"
        )
    if unstorable:
        ctx.report.notes.append(
            f"metadata not stored (not JSON-serialisable): {'; '.join(unstorable)}"
        )
    return {path: (parts, key) for path, (parts, _, key) in zip(flat, stored, strict=True)}, leaves


def _tree(leaves: Iterable[tuple[TreePath, Leaf]], names: dict[TreePath, tuple[Parts, str]]) -> Any:
    """The nested tree Orbax saves; lazy sources (a file being converted) are read here,
    tensor by tensor."""
    return unflatten_mapping(  # keys checked by _check_keys
        {names[path][0]: _array(names[path][1], leaf.value) for path, leaf in leaves}
    )


def _partial_save_context() -> ocp_v1.Context:
    """Orbax v1 options for partial saves: arrays stored as `StandardCheckpointer` stores
    them (zarr v2; v1's zarr v3 default compresses about twice as slowly), and numpy
    arrays written from where they are, not from a copy (Orbax copies them in case the
    caller changes them during an async save: bridge's batch is its own and each save
    is waited for)."""
    context = ocp_v1.Context()
    context.array.saving.use_zarr3 = False
    context.memory.deepcopy_host_arrays = False
    return context


def _as_standard(directory: Path, target: Path) -> None:
    """Turn the finished partial save in `directory` into the checkpoint
    `StandardCheckpointer` writes (`target`: the checkpoint's name, for errors).

    A partial save has the v1 layout: the tree item in `state/`, written and finalized
    (per-process OCDBT stores merged) by the same `BasePyTreeCheckpointHandler` that
    `StandardCheckpointer` uses, so `state/` holds the files a v0 checkpoint holds at its
    root (`_METADATA`, `manifest.ocdbt`, `d/`, `ocdbt.process_*/`), with OCDBT paths
    relative to the item. Beside it: `_CHECKPOINT_METADATA` (custom metadata, timestamps),
    `commit_success.txt` and v1's `orbax.checkpoint` marker. Moving the item's files up,
    dropping the marker, and naming the handler and the commit as v0 does gives v0's
    layout. Anything else found refuses the checkpoint rather than guess.
    """
    item = directory / V1_ITEM
    root = {entry.name for entry in directory.iterdir()}
    lifted = {entry.name for entry in item.iterdir()} if item.is_dir() else set()
    if root != PARTIAL_SAVE_FILES or lifted & root or TREE_METADATA not in lifted:
        raise FormatError(
            f"{target}: Orbax's partial save wrote {sorted(root)} ({V1_ITEM}/: "
            f"{sorted(lifted)}), not the v1 layout bridge turns into a standard checkpoint"
        )
    for name in lifted:
        os.rename(item / name, directory / name)
    item.rmdir()
    (directory / V1_MARKER).unlink()
    with contextlib.closing(
        ocp.metadata.metadata_store(enable_write=True, blocking_write=True)
    ) as store:
        store.update(
            file_path=epath.Path(directory / STEP_METADATA),
            item_handlers=ocp.StandardCheckpointHandler.typestr(),
        )
    (directory / COMMIT_FILE).write_text(f"Checkpoint commit was successful to {directory}")


def _bridge_version() -> str:
    import bridge  # the package imports this adapter, so only here is it complete

    return bridge.__version__


def write(flat: FlatState, ctx: Context) -> Path:
    """Save to `ctx.options["path"]`, waiting until done: with `ocp.StandardCheckpointer`,
    or, converting a file (`ctx.streaming`), batch by batch with Orbax's partial save,
    so that memory holds one batch; both give the same standard (v0) checkpoint.

    A checkpoint directory is one unit, as in Orbax: Orbax saves (into its own temporary,
    then renamed) inside bridge's temporary directory, which takes the place of `path`
    only once complete, so a failure leaves nothing at `path`. Under `jax.distributed`
    every process calls this: they share one temporary (`multihost.shared_output`),
    Orbax's multi-process save writes each one's shards, and a failure on one ends all.
    An existing `path` is refused without `overwrite=True` (an empty directory counts as
    absent); with it, the whole directory is swapped for the new checkpoint.
    """
    if ctx.options.get("path") is None:
        raise FormatError("writing an Orbax checkpoint needs path=... (a directory)")
    target = Path(os.fspath(ctx.options["path"]))
    collection_first = ctx.source in COLLECTION_FIRST_SOURCES
    with multihost.together(f"{target}: laying out the Orbax tree"):
        names, leaves = _layout(flat, ctx, collection_first)
        # read before any process meets Orbax, so a bad array fails every process alike
        tree = None if ctx.streaming else _tree(track(flat, ctx, "reading"), names)
    custom = {
        DESCRIPTION_KEY: {
            "bridge_version": _bridge_version(),
            "source": ctx.source,
            "layout": "collection-first" if collection_first else "module-first",
            "leaves": leaves,
        }
    }
    overwrite = bool(ctx.options.get("overwrite"))
    with multihost.shared_output(target, overwrite=overwrite, directory=True) as temp:
        try:
            if ctx.streaming:
                with _partial_save_context():
                    for run in batches(flat, ctx, "converting"):
                        partial.save(temp, _tree(run, names), custom_metadata=custom)
                        custom = None  # merged into the checkpoint's by later saves
                        release_freed_memory()
                    partial.finalize(temp)
                _as_standard(temp, target)
            else:
                step = f"{target}: Orbax's save (into {temp.parent.name})"  # unique
                with multihost.failing_together(step) as peers:
                    options = ocp.AsyncOptions(barrier_sync_fn=peers.barrier)
                    checkpointer = ocp.StandardCheckpointer(async_options=options)
                    try:
                        checkpointer.save(temp, tree, custom_metadata=custom)
                    except BaseException:
                        checkpointer.close()  # nothing left running in the background
                        raise
                    peers.wait(checkpointer.close, cancel=checkpointer.cancel)
        except BridgeError:
            raise
        except Exception as exc:  # Orbax's own errors: unsupported leaves, I/O, ...
            raise FormatError(f"{target}: Orbax could not save the checkpoint: {exc}") from exc
    return target.absolute()
