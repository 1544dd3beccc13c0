"""Writing Orbax checkpoints: the tree Orbax saves, bridge's description of it, and the
save itself.

Both paths write the standard (v0) checkpoint `ocp.StandardCheckpointer` writes, read
back by `StandardCheckpointer().restore(path)` and by bridge without a template, in one
Orbax save: from memory with `StandardCheckpointer`; converting a file, with the handler
`StandardCheckpointer` uses given the file's leaves unread, which Orbax's numpy writer
then reads and writes a batch at a time (`_BatchWriter`).

Orbax's partial save (`experimental.v1.partial`), the API made for saving one checkpoint
in several calls, is not used: each call reads and merges the tree metadata of every
earlier one, and its finalize compares every pair of keys, so a conversion's time grew
with the square of its batches (15 GB in 1 GB shards: 10 MB/s against 90 MB/s at 1 GB).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future, type_handlers

from bridge import multihost
from bridge.errors import BridgeError, FormatError
from bridge.formats.orbax_locate import STEP_METADATA
from bridge.graph import Context
from bridge.progress import track
from bridge.stream import batches
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


class _Unread:
    """A leaf of the file being converted, in the tree Orbax is given: read only when
    `_BatchWriter` writes its batch."""

    __slots__ = ("leaf", "path")

    def __init__(self, path: TreePath, leaf: Leaf):
        self.path, self.leaf = path, leaf


def _unread(path: TreePath, leaf: Leaf) -> Any:
    """What the streamed save is given for `leaf`: a jax array already in memory (a PRNG
    key Orbax restored) as it is, for Orbax's jax array handler; anything else unread."""
    return leaf.value if isinstance(leaf.value, jax.Array) else _Unread(path, leaf)


class _BatchWriter(type_handlers.NumpyHandler):
    """Orbax's numpy writer for `_Unread` leaves. Orbax hands a handler all its leaves in
    one call; this one reads a batch (`stream.batches`), has Orbax's numpy writer write
    it, and lets it go before reading the next, so memory holds one batch. Its type name
    is the numpy handler's, so the tree metadata is what `StandardCheckpointer` writes
    for numpy arrays. (Only one process streams: `api` agrees every step under
    `jax.distributed`.)"""

    def __init__(self, ctx: Context, names: dict[TreePath, tuple[Parts, str]]):
        super().__init__(deepcopy_host_arrays=False)  # each batch is bridge's own
        self._ctx, self._names = ctx, names

    async def serialize(
        self,
        values: Sequence[_Unread],
        infos: Sequence[Any],
        args: Sequence[Any] | None = None,
    ) -> list[future.Future]:
        args = args or [ocp.SaveArgs()] * len(values)
        return [
            future.CommitFutureAwaitingContractedSignals(
                self._write_batches(values, infos, args), name="bridge_batches"
            )
        ]

    async def _write_batches(
        self, values: Sequence[_Unread], infos: Sequence[Any], args: Sequence[Any]
    ) -> None:
        where = {value.path: pair for value, *pair in zip(values, infos, args, strict=True)}
        for run in batches({value.path: value.leaf for value in values}, self._ctx, "converting"):
            arrays = [_array(self._names[path][1], leaf.value) for path, leaf in run]
            await self._background_serialize(
                arrays, [where[path][0] for path, _ in run], [where[path][1] for path, _ in run]
            )
            del arrays  # before `batches` trims the heap


def _streaming_handler(writer: _BatchWriter) -> ocp.PyTreeCheckpointHandler:
    """The pytree handler `StandardCheckpointHandler` wraps, with its settings, taking
    `writer` for `_Unread` leaves and Orbax's own for jax arrays."""
    registry = type_handlers.create_type_handler_registry(
        (jax.Array, type_handlers.get_type_handler(jax.Array)), (_Unread, writer)
    )
    return ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=96,  # StandardCheckpointHandler's defaults
        restore_concurrent_gb=96,
        use_ocdbt=True,
        type_handler_registry=registry,
    )


def _name_standard_handler(directory: Path) -> None:
    """Name `StandardCheckpointHandler` in the checkpoint's metadata, as its save does:
    the streamed save used the pytree handler it wraps."""
    with contextlib.closing(
        ocp.metadata.metadata_store(enable_write=True, blocking_write=True)
    ) as store:
        store.update(
            file_path=epath.Path(directory / STEP_METADATA),
            item_handlers=ocp.StandardCheckpointHandler.typestr(),
        )


def _orbax_save(
    target: Path, directory: Path, tree: Any, custom: dict[str, Any], writer: _BatchWriter | None
) -> None:
    """One Orbax save of `tree` into `directory` (bridge's temporary for `target`), waited
    for; a failure on any process ends every process's (`multihost.failing_together`)."""
    step = f"{target}: Orbax's save (into {directory.parent.name})"  # unique
    with multihost.failing_together(step) as peers:
        options = ocp.AsyncOptions(barrier_sync_fn=peers.barrier)
        if writer is None:
            checkpointer = ocp.StandardCheckpointer(async_options=options)
            save = lambda: checkpointer.save(directory, tree, custom_metadata=custom)  # noqa: E731
        else:
            checkpointer = ocp.AsyncCheckpointer(_streaming_handler(writer), async_options=options)
            args = ocp.args.PyTreeSave(tree)
            save = lambda: checkpointer.save(directory, args=args, custom_metadata=custom)  # noqa: E731
        try:
            save()
        except BaseException:
            checkpointer.close()  # nothing left running in the background
            raise
        peers.wait(checkpointer.close, cancel=checkpointer.cancel)
    if writer is not None:
        _name_standard_handler(directory)


def _bridge_version() -> str:
    import bridge  # the package imports this adapter, so only here is it complete

    return bridge.__version__


def write(flat: FlatState, ctx: Context) -> Path:
    """Save to `ctx.options["path"]`, waiting until done: with `ocp.StandardCheckpointer`,
    or, converting a file (`ctx.streaming`), with its handler reading and writing a batch
    at a time (`_BatchWriter`), so that memory holds one batch; both give the same
    standard (v0) checkpoint.

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
                tree = unflatten_mapping(
                    {names[path][0]: _unread(path, leaf) for path, leaf in flat.items()}
                )
                writer = _BatchWriter(ctx, names)
            else:
                writer = None
            _orbax_save(target, temp, tree, custom, writer)
        except BridgeError:
            raise
        except Exception as exc:  # Orbax's own errors: unsupported leaves, I/O, ...
            raise FormatError(f"{target}: Orbax could not save the checkpoint: {exc}") from exc
    return target.absolute()
