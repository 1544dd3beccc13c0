"""Orbax checkpoints: a PyTree of arrays in a directory, as `orbax.checkpoint` writes it.

Layouts read, all through the same on-disk PyTree item (`_METADATA` plus an OCDBT store
or per-array zarr directories):

- a v0 `StandardCheckpointer` / `PyTreeCheckpointer` directory: the item is the directory;
- a v1 checkpoint (`ocp.v1.save`): the item is `state/` (`pytree/` in older releases),
  next to `_CHECKPOINT_METADATA`; a directory of several PyTree items (a Composite
  checkpoint) is read as one tree keyed by item name;
- a `CheckpointManager` root: numeric step directories (`<step>` or `<prefix>_<step>`),
  each a checkpoint as above; `step=` picks one, the latest finished one by default.

An unfinished save (`<name>.orbax-checkpoint-tmp-*`) is refused; `orbax_locate` finds
the checkpoint.

This module reads what the checkpoint says: keys, shapes, dtypes and bridge's
description. Restoring arrays (`orbax_restore`) goes through the handler Orbax's
`PyTreeCheckpointHandler` delegates to, its tree metadata read once per conversion and
each batch read by Orbax's type handlers alone. Writing (`orbax_save`) gives the standard
v0 checkpoint `StandardCheckpointer` writes, whether from memory or converting a file in
batches (one Orbax save whose numpy writer reads a batch at a time).

Orbax stores dict keys as strings and names arrays by joining keys with ".", so int keys
come back as digit strings, and `{"a.b": x, "a": {"b": y}}` silently restores one of the
two arrays under both keys (whichever was written last).
`write` refuses such keys and stores a description (Variable kinds, int key positions,
partitioning metadata) in the checkpoint's custom metadata, from which `read` rebuilds the
exact flat state without a template. For checkpoints bridge did not write, digit strings
stay strings unless the template has an int there: whether `"0"` was an `nnx.List` index
or a dict key is not recorded. `None` leaves and empty dicts hold no array: they are left
out of the flat state and listed in the report's notes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import reprlib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from bridge.errors import FormatError
from bridge.formats.orbax_locate import STEP_METADATA, Checkpoint, detect, locate
from bridge.formats.orbax_restore import Entry, Item, StoredPath, flatten, is_empty, restore
from bridge.formats.orbax_save import DESCRIPTION_KEY, LAYOUTS, write
from bridge.graph import (
    Context,
    drop_transient,
    register_conversion,
    register_format,
    set_aside_training,
)
from bridge.tree import (
    MESH,
    TRAINING_FIELDS,
    FlatState,
    Leaf,
    dotted,
    index_of,
    is_linen_collection,
    is_training_state,
    match_key,
    positions,
)
from bridge.tree import Path as TreePath

DESCRIPTION_FIELDS = {"bridge_version": str, "source": str, "layout": str, "leaves": dict}
LEAF_FIELDS = {"kind": str | None, "ints": list, "metadata": dict, "transient": bool, "key": bool}
"""The fields of bridge's description and of its record of each array, with their types."""
RESERVED_METADATA = frozenset({"value", MESH})
"""Names no Variable metadata stored by bridge has: the value itself, and the mesh (no
JSON holds a jax Mesh)."""


@dataclasses.dataclass
class _Scan:
    """What the metadata says, before any array data is read."""

    checkpoint: Checkpoint
    items: dict[str, Item]
    """Each item, opened: its metadata read once for the whole conversion."""
    entries: list[Entry]


# --- reading metadata -------------------------------------------------------------------


def _description(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """bridge's description from the checkpoint's custom metadata, if bridge wrote it."""
    if set(checkpoint.items) != {""} or not (checkpoint.directory / STEP_METADATA).is_file():
        return None
    where = checkpoint.directory / STEP_METADATA
    try:
        custom = ocp.metadata.get_step_metadata(checkpoint.directory).custom_metadata
    except Exception as exc:  # Orbax raises ValueError for an unparsable file, and others
        raise FormatError(f"{where}: not readable checkpoint metadata ({exc})") from exc
    description = (custom or {}).get(DESCRIPTION_KEY)
    if description is None:
        return None
    reason = _malformed(description, DESCRIPTION_FIELDS, required=DESCRIPTION_FIELDS)
    if reason is None and description["layout"] not in LAYOUTS:
        reason = f"has layout {reprlib.repr(description['layout'])}, expected one of {LAYOUTS}"
    if reason is not None:
        raise FormatError(
            f"{where}: the {DESCRIPTION_KEY!r} custom metadata {reason}: the checkpoint was "
            "changed after bridge wrote it"
        )
    return description


def _malformed(record: Any, fields: Mapping[str, Any], required: Collection[str]) -> str | None:
    """Why `record` is not a JSON object of `fields` (name -> type) with every `required`
    one, or None."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, expected an object"
    if missing := sorted(set(required) - set(record)):
        return f"lacks {', '.join(missing)}"
    if unknown := sorted(set(record) - set(fields)):
        return f"has unknown fields {reprlib.repr(unknown)}"
    for name, value in record.items():
        if not isinstance(value, fields[name]):
            return f"has {name}={reprlib.repr(value)}, not of the type bridge writes"
    return None


def _from_json(value: Any) -> Any:
    """JSON lists back to the tuples Flax metadata holds."""
    if isinstance(value, list):
        return tuple(_from_json(item) for item in value)
    if isinstance(value, dict):
        return {key: _from_json(item) for key, item in value.items()}
    return value


class _Known(NamedTuple):
    """What is known of one stored array beyond its shape and dtype."""

    path: TreePath
    kind: str | None
    metadata: Mapping[str, Any]
    transient: bool = False
    is_key: bool = False


def _described(full: list[StoredPath], description: dict[str, Any], where: Path) -> list[_Known]:
    """Each array as bridge's description records it: the exact original leaf."""
    leaves: dict[str, Any] = description["leaves"]
    collection_first = description["layout"] == "collection-first"
    names = [".".join(str(part) for part in parts) for parts in full]
    if disagree := sorted(set(names) ^ set(leaves)):
        raise FormatError(
            f"{where}: the checkpoint's arrays and bridge's description of them disagree "
            f"(e.g. {disagree[0]!r}): the checkpoint was changed after bridge wrote it"
        )
    return [
        _known(name, parts, leaves[name], collection_first, where)
        for name, parts in zip(names, full, strict=True)
    ]


def _known(name: str, parts: StoredPath, info: Any, collection_first: bool, where: Path) -> _Known:
    """One array as its record in the description says, every field checked: a tampered
    record is refused, never read as another key, kind or leaf."""

    def malformed(reason: str) -> FormatError:
        return FormatError(
            f"{where}: bridge's description of array {name!r} {reason}: the checkpoint was "
            "changed after bridge wrote it"
        )

    if reason := _malformed(info, LEAF_FIELDS, required={"kind"}):
        raise malformed(reason)
    kind = info["kind"]
    path = parts[1:] if collection_first else parts
    if collection_first and (not path or parts[0] != (kind or "params")):
        raise malformed(f"has kind {kind!r}, but is stored under {parts[0]!r}")
    ints = info.get("ints", [])
    if not all(
        type(index) is int and 0 <= index < len(path) and index_of(path[index]) is not None
        for index in ints
    ):
        raise malformed(
            f"has ints={reprlib.repr(ints)}, but only the digit parts of {list(path)} can be "
            "list positions"
        )
    metadata = info.get("metadata", {})
    if reserved := sorted(RESERVED_METADATA & set(metadata)):
        raise malformed(f"has metadata {reserved}, which bridge never stores")
    try:
        metadata = _from_json(metadata)
    except RecursionError:
        raise malformed("has metadata nested too deep") from None
    return _Known(
        tuple(index_of(part) if index in ints else part for index, part in enumerate(path)),
        kind,
        metadata,
        info.get("transient", False),
        info.get("key", False),
    )


def _guessed(full: list[StoredPath], template_keys: set[str]) -> list[_Known]:
    """Each array of a checkpoint bridge did not write, as far as its tree tells.

    A Linen-style tree (every top key a registered Linen collection, or a TrainState:
    collections next to `step` / `opt_state`) has its collection as kind; training
    fields keep their full path. A trailing `value` on every leaf is what saving
    `nnx.State` (or boxed Linen variables) adds: it is dropped. With a template, each
    leaf takes the spelling the template knows: digit strings as ints, with or without
    the trailing `value`.
    """
    training = is_training_state(dict.fromkeys(parts[0] for parts in full))
    linen_style = training or (bool(full) and all(is_linen_collection(p[0]) for p in full))
    bodies = [
        parts[1:] if linen_style and parts[0] not in TRAINING_FIELDS else parts for parts in full
    ]
    strip_value = all(len(body) > 1 and body[-1] == "value" for body in bodies)
    known = []
    for parts, body in zip(full, bodies, strict=True):
        stripped = body[:-1] if len(body) > 1 and body[-1] == "value" else None
        default = stripped if strip_value and stripped else body
        spellings = [default, body if strip_value else stripped]
        candidates = [form for s in spellings if s for form in (s, positions(s))]
        path = next((c for c in candidates if match_key(c) in template_keys), default)
        kind = str(parts[0]) if linen_style and body is not parts else None
        known.append(_Known(path, kind, {}))
    return known


def _entries(
    trees: dict[str, Any], description: dict[str, Any] | None, ctx: Context, where: Path
) -> tuple[list[Entry], list[str], list[str]]:
    """The arrays of every item, with bridge paths, kinds and metadata; plus the names of
    empty nodes and of leaves that are not arrays."""
    arrays: list[tuple[str, StoredPath, Any]] = []
    empty: list[str] = []
    not_arrays: list[str] = []
    for item, tree in trees.items():
        for stored, value in flatten(tree):
            name = ".".join(str(part) for part in ((item,) if item else ()) + stored)
            if is_empty(value):
                empty.append(name)
            elif isinstance(value, ocp.metadata.ArrayMetadata):
                arrays.append((item, stored, value))
            else:
                not_arrays.append(f"{name} ({type(value).__name__})")

    full = [((item,) if item else ()) + stored for item, stored, _ in arrays]
    if description is None:
        template_keys = {match_key(path) for path in ctx.template_flat or {}}
        known = _guessed(full, template_keys)
    else:
        known = _described(full, description, where)
    entries = []
    for (item, stored, meta), info in zip(arrays, known, strict=True):
        abstract = jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype)
        leaf = Leaf(abstract, kind=info.kind, metadata=info.metadata, transient=info.transient)
        is_scalar = isinstance(meta, ocp.metadata.ScalarMetadata)
        entries.append(Entry(item, stored, info.path, leaf, info.is_key, is_scalar))
    if description is None and is_training_state(dict.fromkeys(parts[0] for parts in full)):
        entries = list(set_aside_training({e.path: e for e in entries}, str(where), ctx).values())
    return entries, empty, not_arrays


def _selector(only: Any, entries: list[Entry]) -> Callable[[Entry], bool]:
    """`only=`: a collection (leaf kind) of this checkpoint, else a regular expression
    searched in dotted keys."""
    if not isinstance(only, str):
        raise FormatError(f"only={only!r}: expected a collection name or a regular expression")
    kinds = {entry.leaf.kind for entry in entries if entry.leaf.kind}
    if only in kinds:
        return lambda entry: entry.leaf.kind == only
    try:
        pattern = re.compile(only)
    except re.error as exc:
        raise FormatError(
            f"only={only!r} is neither a collection of this checkpoint ({sorted(kinds)}) nor a "
            f"regular expression ({exc})"
        ) from None
    return lambda entry: pattern.search(dotted(entry.path)) is not None


def _scan(obj: Any, ctx: Context) -> _Scan:
    """Locate the checkpoint and read its metadata: keys, shapes, dtypes, description."""
    checkpoint = locate(Path(os.fspath(obj)).absolute(), ctx.options.get("step"))
    items = {name: Item(directory) for name, directory in checkpoint.items.items()}
    trees = {name: item.tree for name, item in items.items()}
    where = checkpoint.directory
    entries, empty, not_arrays = _entries(trees, _description(checkpoint), ctx, where)
    seen: dict[TreePath, Entry] = {}
    for entry in entries:
        if entry.path in seen:
            raise FormatError(
                f"{where}: {seen[entry.path].orbax_name!r} and {entry.orbax_name!r} are both "
                f"{dotted(entry.path)!r} once the collection is taken as the kind; a flat state "
                "cannot hold both (pass source=... and a rule to rename one)"
            )
        seen[entry.path] = entry
    if len(checkpoint.items) > 1:
        ctx.report.notes.append(
            f"{where}: items {sorted(checkpoint.items)} read as one tree keyed by item name"
        )
    if empty:
        ctx.report.notes.append(
            f"{where}: {len(empty)} empty entries (None, empty dicts) hold no array and are "
            f"left out: {', '.join(empty)}"
        )
    if not_arrays:
        ctx.report.notes.append(
            f"{where}: {len(not_arrays)} leaves are not arrays and are left out: "
            f"{', '.join(not_arrays)}"
        )
    only = ctx.options.get("only")
    if only is not None and entries:
        keep = _selector(only, entries)
        chosen = [entry for entry in entries if keep(entry)]
        if not chosen:
            raise FormatError(
                f"{where}: only={only!r} selects none of its {len(entries)} arrays (keys such "
                f"as {dotted(entries[0].path)!r}; collections "
                f"{sorted({e.leaf.kind for e in entries if e.leaf.kind})})"
            )
        ctx.report.notes.append(
            f"only={only!r}: {len(entries) - len(chosen)} of {len(entries)} arrays not read"
        )
        entries = chosen
    return _Scan(checkpoint, items, entries)


def inspect(obj: str | os.PathLike[str], ctx: Context) -> FlatState:
    """Keys, shapes, dtypes and kinds from Orbax's metadata; no array data is read. A PRNG
    key array shows as the key data Orbax stores (uint32, one trailing axis more)."""
    return {entry.path: entry.leaf for entry in _scan(obj, ctx).entries}


def read(obj: str | os.PathLike[str], ctx: Context) -> FlatState:
    """Restore the checkpoint's arrays (those `only=` selects), as `orbax_restore.restore`
    does: into the template's shardings, batch by batch, or lazily when streaming."""
    scan = _scan(obj, ctx)
    return restore(scan.items, scan.entries, ctx)


# --- detection and registration ---------------------------------------------------------


register_format(
    "orbax",
    detect=detect,
    read=read,
    write=write,
    inspect=inspect,
    description="an Orbax checkpoint directory (v0, v1, or a CheckpointManager root of steps)",
    options={"path", "overwrite"},
    read_options={"step", "only"},
)
register_conversion("orbax", "nnx_state", cost=1.0)
register_conversion("nnx_state", "orbax", cost=1.0, needs={"path"})
register_conversion(
    "orbax", "linen", cost=1.0, lossy=True, loses="NNX RNG state", transform=drop_transient
)
register_conversion("linen", "orbax", cost=1.0, needs={"path"})
