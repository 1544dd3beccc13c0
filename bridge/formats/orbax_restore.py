"""Restoring the arrays of an Orbax checkpoint, a batch at a time, each batch at a cost that
grows with the batch, not with the checkpoint.

Orbax's `PyTreeCheckpointHandler.restore` restores a tree: every call reads and parses the
item's `_METADATA`, maps over the whole tree and builds a `ParamInfo` for every array, even
when all leaves but a batch's are placeholders (`partial_restore=True` does the same
work). Restoring n arrays in k batches through it cost O(k*n): Orbax -> safetensors of
1.5 GB in 8 MB batches spent 12.8 of its 18.4 s in those calls; 2,000 arrays in 125
batches took 75 s. An `Item` does that whole-tree work once, with the handler's own
methods, and restores a batch with the call `restore` makes to read arrays, the type
handlers' `deserialize`, given the batch's arrays alone: the same tensorstore reads, the
same arrays (3.1 of 8.5 s; 1.5 s). Those methods are the handler's private ones: Orbax
has no public call for them, pyproject pins orbax-checkpoint to 0.12, and the tests
compare every restore with Orbax's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src import asyncio_utils

from bridge.errors import FormatError
from bridge.formats.orbax_save import is_key_dtype
from bridge.graph import Context
from bridge.stream import Fetched, Fetcher, batch_bytes, release_freed_memory
from bridge.tree import FlatState, Leaf, match_key
from bridge.tree import Path as TreePath

LOAD_BATCH_BYTES = 32 * 2**20
"""A load's default batch: half the streaming default, as fast on this machine and
0.02-0.05x of the checkpoint less memory at 1 GB (benchmarks/RESULTS.md)."""
MIN_RESTORE_BATCH = 4 * 2**20
"""The smallest batch of a load: smaller Orbax calls cost more time than they save memory."""

Key = str | int
StoredPath = tuple[Key, ...]


def _key(entry: Any) -> Key:
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    return str(entry)


def is_empty(node: Any) -> bool:
    return node is None or (isinstance(node, dict | list | tuple) and not node)


def flatten(tree: Any) -> list[tuple[StoredPath, Any]]:
    """`(key path, leaf)` of every leaf of an Orbax tree, empty nodes (None, {}) included."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_empty)
    return [(tuple(_key(entry) for entry in keypath), value) for keypath, value in flat]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One array of the checkpoint: where Orbax keeps it, where bridge puts it."""

    item: str
    stored: StoredPath
    """The key path inside the item's tree."""
    path: TreePath
    leaf: Leaf
    """Abstract (`ShapeDtypeStruct`) until restored."""
    is_key: bool = False
    """A typed PRNG key array: Orbax stores its key data and re-wraps it when restored
    as a `jax.Array`."""
    is_scalar: bool = False
    """Saved as a Python scalar: restored as numpy, whose float64 / int64 jax may not keep."""

    @property
    def orbax_name(self) -> str:
        return ".".join(str(part) for part in ((self.item,) if self.item else ()) + self.stored)


class Item(Fetcher):
    """One PyTree item of a checkpoint, opened once per conversion: its `_METADATA` read
    once, every array's `ParamInfo` built once (as `BasePyTreeCheckpointHandler.restore`
    builds them on each call), then arrays restored any number at a time."""

    tree: Any
    """Orbax's metadata tree, as `PyTreeCheckpointHandler.metadata` gives it: shapes and
    dtypes, no array data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._handler = ocp.BasePyTreeCheckpointHandler()
        try:
            self._metadata = asyncio_utils.run_sync(
                self._handler._read_metadata_file(epath.Path(directory))
            )
            self.tree = self._metadata.as_custom_metadata(
                epath.Path(directory), self._handler._type_handler_registry
            )
        except Exception as exc:  # JSON, tensorstore and file errors alike mean "unreadable"
            raise FormatError(
                f"{directory}: cannot read Orbax's tree metadata: {first_line(exc)}"
            ) from exc

    @functools.cached_property
    def _infos(self) -> dict[StoredPath, Any]:
        """Each leaf's `ParamInfo`, with the settings `restore` takes from the metadata."""
        metadata, directory = self._metadata, epath.Path(self.directory)
        infos = self._handler._get_param_infos(
            item=metadata.as_nested_tree(),
            directory=directory,
            use_ocdbt=ocp.type_handlers.is_ocdbt_checkpoint(directory)
            if metadata.use_ocdbt is None
            else metadata.use_ocdbt,
            use_zarr3=bool(metadata.use_zarr3),  # the handler's default: False
            raise_array_data_missing_error=metadata.store_array_data_equal_to_fill_value,
        )
        return dict(flatten(infos))

    def restore(self, wanted: Mapping[StoredPath, ocp.RestoreArgs]) -> dict[StoredPath, Any]:
        """The `wanted` arrays, each restored as its args' `restore_type` says, by one
        `deserialize` call per type handler."""
        requests: dict[Any, tuple[list[StoredPath], list[Any], list[Any]]] = {}
        try:
            for stored, args in wanted.items():
                handler = self._handler._type_handler_registry.get(args.restore_type)
                keys, infos, arguments = requests.setdefault(handler, ([], [], []))
                keys.append(stored)
                infos.append(self._infos[stored])
                arguments.append(args)

            async def deserialize() -> list[Any]:
                reads = [handler.deserialize(i, a) for handler, (_, i, a) in requests.items()]
                return await asyncio.gather(*reads)

            results = asyncio_utils.run_sync(deserialize())
        except Exception as exc:  # tensorstore reports missing or cut data as ValueError
            raise FormatError(
                f"{self.directory}: Orbax could not restore the arrays, the checkpoint is "
                f"corrupt or incomplete ({first_line(exc)})"
            ) from exc
        return {
            stored: array
            for (keys, _, _), arrays in zip(requests.values(), results, strict=True)
            for stored, array in zip(keys, arrays, strict=True)
        }

    def fetch(self, arrays: list[_Stored]) -> list[np.ndarray]:  # type: ignore[override]
        """Arrays of a streamed conversion, as numpy on the host."""
        restored = self.restore({a.entry.stored: restore_args(a.entry, None) for a in arrays})
        return [restored[array.entry.stored] for array in arrays]


class _Stored(Fetched):
    """One array of the checkpoint, restored when its batch is fetched (or alone)."""

    def __init__(self, entry: Entry, item: Item) -> None:
        self.entry = entry
        self.fetcher = item
        self.shape = entry.leaf.shape
        self.dtype = entry.leaf.dtype


def restore_args(entry: Entry, like: Leaf | None) -> ocp.RestoreArgs:
    """How one array is restored: PRNG keys as jax arrays (Orbax re-wraps them), onto the
    template's sharding or the host; an array whose template leaf has the same shape and
    dtype, straight into a jax array on the template's sharding (the default device if it
    has none), so the writer need not copy it again; anything else as numpy on the host
    (a leaf that does not fit its template is left for the matcher to report)."""
    sharding = getattr(like.value, "sharding", None) if like is not None else None
    if entry.is_key or (like is not None and is_key_dtype(like.dtype)):
        return ocp.ArrayRestoreArgs(
            restore_type=jax.Array,
            sharding=sharding
            or jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0]),
        )
    if (
        like is not None
        and (like.shape, like.dtype) == (entry.leaf.shape, entry.leaf.dtype)
        and not entry.is_scalar
    ):
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding)
    return ocp.RestoreArgs(restore_type=np.ndarray)


def _shrinking_batches(entries: list[Entry], size: int) -> Iterator[list[Entry]]:
    """`entries` largest first, in batches of at most `size` bytes and at most half the
    bytes not yet restored (`MIN_RESTORE_BATCH` at least; a larger array alone).

    Orbax holds a batch twice while restoring it into jax arrays (tensorstore's host
    buffer and the device copy): batches no larger than what remains keep the peak near
    the checkpoint's own size, where fixed-size batches end one batch above it.
    """
    remaining = sum(entry.leaf.nbytes for entry in entries)
    batch: list[Entry] = []
    held = limit = 0
    for entry in sorted(entries, key=lambda entry: -entry.leaf.nbytes):
        if batch and held + entry.leaf.nbytes > limit:
            yield batch
            remaining -= held
            batch, held = [], 0
        if not batch:
            limit = max(MIN_RESTORE_BATCH, min(size, remaining // 2))
        batch.append(entry)
        held += entry.leaf.nbytes
    if batch:
        yield batch


def restore(items: dict[str, Item], entries: list[Entry], ctx: Context) -> FlatState:
    """`entries` restored: into the template's shardings where it gives them, as numpy
    arrays on the host otherwise, in batches (`_shrinking_batches`: Orbax stages every
    array of one call in host memory at once). Everything is restored before anything is
    returned, unless streaming: then each leaf is a lazy array restored with its batch
    when the writer gets to it."""
    if ctx.streaming:

        def lazy(entry: Entry) -> Any:  # PRNG keys now: typed jax arrays, small
            stored = _Stored(entry, items[entry.item])
            return stored.fetcher.fetch([stored])[0] if entry.is_key else stored

        return {entry.path: entry.leaf.replace(value=lazy(entry)) for entry in entries}
    template = {match_key(path): leaf for path, leaf in (ctx.template_flat or {}).items()}
    values: dict[tuple[str, StoredPath], Any] = {}
    for batch in _shrinking_batches(entries, batch_bytes(ctx, LOAD_BATCH_BYTES)):
        for name, item in items.items():
            wanted = {
                entry.stored: restore_args(entry, template.get(match_key(entry.path)))
                for entry in batch
                if entry.item == name
            }
            if wanted:
                restored = item.restore(wanted)
                values.update({(name, stored): value for stored, value in restored.items()})
        release_freed_memory()
    return {
        entry.path: entry.leaf.replace(value=values[entry.item, entry.stored]) for entry in entries
    }
