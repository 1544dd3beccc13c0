"""Flax msgpack: the bytes of `flax.serialization.to_bytes` / `msgpack_serialize`, or a file
holding them (legacy Linen checkpoints).

Flax's own `msgpack_restore` decodes (chunked arrays, ndarray / scalar / complex
extension types, bfloat16, int map keys) and `msgpack_serialize` encodes, so files stay
readable by `flax.serialization.from_bytes`. A tree whose top keys are all registered
Linen collections is Linen variables: the collection is each leaf's kind and is not part
of its path. Anything else (a pure NNX dict, a TrainState) keeps full paths, no kind.

Keys: Flax's state dicts spell list / tuple positions as digit strings (`"0"`), and
`msgpack_serialize` may store int keys; both are int path parts (`("layers", 0)`), as
NNX and `tree.parse_dotted` spell them. In Linen variables every key is a module name
(transformers' Flax models name their layers `'0'`, `'1'`), so there digit strings stay
strings and the tree reads back as it was written. Writing spells positions as strings
again, as `to_bytes` does: `from_bytes` compares keys as strings and accepts nothing else.

Empty subtrees (`{}`, `None`, `[]`, e.g. optax's `EmptyState` in a TrainState) hold no
array; like `jax.tree.leaves`, the flat state does not carry them (a note says which).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path as FilePath
from typing import Any, BinaryIO

import msgpack
import numpy as np
from flax import serialization, traverse_util

from bridge import multihost
from bridge.atomic import atomic_output
from bridge.errors import FormatError
from bridge.graph import (
    Context,
    drop_transient,
    register_conversion,
    register_format,
    set_aside_training,
)
from bridge.stream import items
from bridge.tree import (
    FlatState,
    Leaf,
    Path,
    as_numpy,
    by_collection,
    check_nestable,
    index_of,
    is_linen_collection,
    is_training_state,
    linen_path,
    unflatten_mapping,
)

SUFFIX = ".msgpack"
MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
"""First byte of a msgpack map (fixmap, map 16, map 32): Flax writes a state dict."""
NATIVE = (bool, int, float, complex, str, bytes)
"""Python values msgpack stores as themselves (a TrainState's `step` is a Python int)."""
NDARRAY = 1
"""Flax's msgpack extension code for an ndarray (`serialization._MsgpackExtType.ndarray`)."""
FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
"""msgpack's fixed-length extension codes, by payload length."""
CHUNKED = "__msgpack_chunked_array__"
"""The marker key of an array Flax wrote in chunks."""
_PACKER = msgpack.Packer()
MAX_DEPTH = 128
"""The deepest nesting read: far beyond any model's, far below what would exhaust
Python's recursion (msgpack itself decodes maps nested 1000 deep)."""


def is_collection_first(tree: Mapping[Any, Any]) -> bool:
    """True when every top key of a non-empty tree names a registered Linen collection
    (Flax's registry, so custom Variable types count) and holds a subtree."""
    return bool(tree) and all(
        is_linen_collection(key) and isinstance(value, Mapping) for key, value in tree.items()
    )


# Reading.


@dataclasses.dataclass
class _Seen:
    """What a walk finds besides leaves: empty subtrees, and maps that look like Flax's
    serialization of a boxed variable (`{"value": array}`)."""

    empty: list[Path] = dataclasses.field(default_factory=list)
    boxes: list[Path] = dataclasses.field(default_factory=list)


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray | np.generic)


def _part(key: Any, where: str, parent: Path, linen: bool) -> str | int:
    """A map key as a path part: canonical digit strings and ints are positions, except
    in Linen variables, whose keys are module names (`'0'` is a module named '0')."""
    if type(key) is int:
        return key
    if type(key) is not str:
        raise FormatError(
            f"{where}: key {key!r} under {'/'.join(map(str, parent)) or 'the top level'} "
            f"is a {type(key).__name__}; a path part is a string or an int"
        )
    index = None if linen else index_of(key)
    return key if index is None else index


def _walk(
    node: Any, path: Path, where: str, seen: _Seen, linen: bool
) -> Iterator[tuple[Path, Any]]:
    """`(path, leaf value)` of a restored tree, checking every key and value."""
    if len(path) > MAX_DEPTH:
        raise FormatError(
            f"{where}: {'/'.join(map(str, path[:3]))}/... nests more than {MAX_DEPTH} deep; "
            "not a Flax state"
        )
    if isinstance(node, dict | list):
        if not node and path:
            seen.empty.append(path)
        if isinstance(node, dict) and node.keys() == {"value"} and _is_array(node["value"]):
            seen.boxes.append((*path, "value"))
        parts: dict[str | int, Any] = {}
        for key, child in list(node.items() if isinstance(node, dict) else enumerate(node)):
            part = _part(key, where, path, linen)
            if isinstance(child, np.ndarray) and not child.flags.writeable:
                # Flax returns views into the decoded buffer, read-only: a copy behaves like
                # any array a user may fill in place (jax copies into its own buffer anyway).
                # It replaces the view, so the buffer is freed array by array.
                node[key] = child = child.copy()
            if part in parts:
                raise FormatError(
                    f"{where}: keys {parts[part]!r} and {key!r} under "
                    f"{'/'.join(map(str, path)) or 'the top level'} are both position {part}"
                )
            parts[part] = key
            yield from _walk(child, (*path, part), where, seen, linen)
    elif node is None:
        seen.empty.append(path)
    elif _is_array(node) or type(node) in NATIVE:
        yield path, node
    else:
        described = f"extension type {node.code}" if isinstance(node, msgpack.ExtType) else None
        raise FormatError(
            f"{where}: {'/'.join(map(str, path))!r} holds "
            f"{described or type(node).__name__}, which Flax msgpack does not write"
        )


def _restore(data: bytes | bytearray, where: str) -> Any:
    try:
        return serialization.msgpack_restore(data)
    except msgpack.ExtraData as exc:
        raise FormatError(
            f"{where}: the msgpack map ends at offset {len(data) - len(exc.extra)}, but "
            f"{len(exc.extra)} more bytes follow; not one Flax msgpack state"
        ) from None
    except RecursionError:
        raise FormatError(
            f"{where}: maps and lists nest too deep to decode; not a Flax msgpack state"
        ) from None
    except (msgpack.UnpackException, ValueError, TypeError, KeyError, IndexError) as exc:
        raise FormatError(
            f"{where}: cannot decode {len(data)} bytes as Flax msgpack "
            f"({type(exc).__name__}: {exc}); the data is truncated or corrupt"
        ) from None


def read(obj: bytes | bytearray | str | os.PathLike[str], ctx: Context) -> FlatState:
    """Bytes or a file -> `{path: Leaf}`: every byte is decoded and checked before
    anything is returned."""
    if isinstance(obj, bytes | bytearray):
        where = f"msgpack bytes ({len(obj)} bytes)"
        tree = _restore(obj, where)  # arrays never alias `obj`: msgpack copies ext payloads
    else:
        file = FilePath(os.fspath(obj))
        if not file.is_file():
            raise FormatError(f"{file}: no such file")
        where = str(file)
        tree = _restore(file.read_bytes(), where)  # the file's bytes are freed once decoded
        if multihost.processes() > 1:
            ctx.report.notes.append(
                f"{where}: each of the {multihost.processes()} processes parses the whole "
                "file (msgpack has no index to read a slice by)"
            )
    if not isinstance(tree, dict):
        raise FormatError(
            f"{where}: the top level is of type {type(tree).__name__}; Flax msgpack "
            "checkpoints hold a state dict (a map)"
        )
    seen = _Seen()
    training = is_training_state(tree)
    linen = training or is_collection_first(tree)
    flat = dict(_walk(tree, (), where, seen, linen))
    if training:
        flat = set_aside_training(flat, where, ctx)
    if seen.empty:
        shown = ", ".join("/".join(map(str, path)) for path in seen.empty[:5])
        ctx.report.notes.append(
            f"{where}: {len(seen.empty)} empty subtrees hold no array and are not carried: "
            + shown
            + (" ..." if len(seen.empty) > 5 else "")
        )
    if not linen:
        return {path: Leaf(value) for path, value in flat.items()}
    if seen.boxes:
        ctx.report.notes.append(
            f"{where}: {'/'.join(map(str, seen.boxes[0]))!r} and {len(seen.boxes) - 1} more "
            "look like boxed variables (nn.Partitioned) as flax.serialization writes them; "
            r"pass rules=[(r'\.value$', '')] to read them without '/value'"
        )
    return by_collection(flat, where)


# Writing.


@functools.cache
def _restorable(dtype: np.dtype) -> bool:
    """Whether Flax restores arrays of `dtype` as that dtype, asked of Flax itself."""
    try:
        probe = serialization.msgpack_serialize({"x": np.zeros(0, dtype)})
        return serialization.msgpack_restore(probe)["x"].dtype == dtype
    except (TypeError, ValueError):
        return False


def _value(key: str, leaf: Leaf) -> Any:
    """What msgpack stores for a leaf: native values as they are, everything else as a
    numpy array in native byte order (Flax records the dtype's name, not its order)."""
    if leaf.is_abstract:
        raise FormatError(f"{key!r} is abstract ({leaf.value}); it has no data to write")
    value = leaf.value
    if type(value) in NATIVE:
        return value
    if not isinstance(value, np.generic):
        value = as_numpy(key, value)
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
    if not _restorable(value.dtype):
        raise FormatError(f"{key!r}: flax.serialization cannot restore dtype {value.dtype}")
    return value


def _key(path: Path, leaf: Leaf) -> tuple[str, ...]:
    """Kinds are written collection-first with Linen names (`layers_0`), so the file is
    Linen variables; kind-less leaves keep their path, positions spelled as strings."""
    if leaf.kind:
        return (leaf.kind, *linen_path(path))
    return tuple(str(part) for part in path)


def _header(fixed: dict[int, int], sized: tuple[int, int, int], length: int) -> bytes:
    """A msgpack bin / ext header for `length` bytes: a fixed-size code where the length
    has one, else the 8-, 16- or 32-bit length form, as msgpack's packer picks."""
    if length in fixed:
        return bytes([fixed[length]])
    for code, width in zip(sized, (1, 2, 4), strict=True):
        if length < 256**width:
            return bytes([code]) + length.to_bytes(width, "big")
    raise FormatError(f"{length} bytes exceed what one msgpack value holds (4 GiB)")


def _write_array(out: BinaryIO, array: np.ndarray) -> None:
    """`array` as Flax's ndarray extension, its data written from where it lies: the
    bytes of `packb(ExtType(1, packb((shape, dtype name, data))))` without the copies."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    fields = b"\x93" + msgpack.packb(array.shape) + msgpack.packb(array.dtype.name)
    fields += _header({}, (0xC4, 0xC5, 0xC6), data.size)
    size = len(fields) + data.size
    out.write(_header(FIXEXT, (0xC7, 0xC8, 0xC9), size) + bytes([NDARRAY]) + fields)
    out.write(data)


def _write_value(out: BinaryIO, value: Any) -> None:
    """One leaf as `msgpack_serialize` writes it: an array over Flax's `MAX_CHUNK_SIZE`
    as its chunked form, read at write time as Flax does."""
    if not isinstance(value, np.ndarray):
        out.write(serialization.msgpack_serialize(value))
        return
    if value.size * value.dtype.itemsize <= serialization.MAX_CHUNK_SIZE:
        _write_array(out, value)
        return
    step = max(1, int(serialization.MAX_CHUNK_SIZE / value.dtype.itemsize))
    chunks = range(0, value.size, step)
    out.write(_PACKER.pack_map_header(3) + msgpack.packb(CHUNKED) + msgpack.packb(True))
    out.write(msgpack.packb("shape"))
    out.write(msgpack.packb({str(axis): size for axis, size in enumerate(value.shape)}))
    out.write(msgpack.packb("chunks") + _PACKER.pack_map_header(len(chunks)))
    for number, start in enumerate(chunks):
        out.write(msgpack.packb(str(number)))
        _write_array(out, value.reshape(-1)[start : start + step])


def _dump(flat: FlatState, ctx: Context, out: BinaryIO) -> None:
    """The bytes `msgpack_serialize` makes of the nested tree, written as a stream: one
    leaf in memory at a time, read in the tree's order, batch by batch."""
    keys = {path: _key(path, leaf) for path, leaf in flat.items()}
    if () in keys.values():
        raise FormatError("a leaf with an empty path has no key in a msgpack map")
    check_nestable(keys.values(), ctx.report.subject or "msgpack", sep="/")
    tree = unflatten_mapping({key: path for path, key in keys.items()})
    order = traverse_util.flatten_dict(tree).values()
    leaves = items({path: flat[path] for path in order}, ctx, "saving")
    _write_node(out, tree, leaves, keys)
    next(leaves, None)  # the end of the stream: its bar completes
    if with_metadata := sum(bool(leaf.metadata) for leaf in flat.values()):
        ctx.report.notes.append(
            f"{with_metadata} leaves written without their Variable metadata (partitioning, "
            "...): Flax msgpack holds arrays only"
        )


def _write_node(
    out: BinaryIO, node: Any, leaves: Iterator[tuple[Path, Leaf]], keys: dict[Path, tuple]
) -> None:
    """`node` of the nested tree, its leaves taken from `leaves` in the tree's order (a
    function of the module, not a closure: a closure calling itself is a cycle, which
    would hold the stream of leaves until the next collection)."""
    if isinstance(node, dict):
        out.write(_PACKER.pack_map_header(len(node)))
        for key, child in node.items():
            out.write(msgpack.packb(key))
            _write_node(out, child, leaves, keys)
    else:
        path, leaf = next(leaves)
        _write_value(out, _value("/".join(keys[path]), leaf))


def write(flat: FlatState, ctx: Context) -> bytes | FilePath:
    """The msgpack bytes; with `path=...`, a file written atomically instead (an existing
    one only with `overwrite=True`), and its path returned, streamed leaf by leaf. Under
    `jax.distributed` process 0 streams the file, gathering each array that spans
    processes when it reaches it (it holds one such array, not the model) while the
    others serve the gathers and wait for the file to be in place."""
    if ctx.options.get("path") is None:
        buffer = io.BytesIO()
        _dump(flat, ctx, buffer)
        return buffer.getvalue()
    target = FilePath(os.fspath(ctx.options["path"]))
    overwrite = bool(ctx.options.get("overwrite"))

    def save() -> FilePath:
        with atomic_output(target, overwrite=overwrite) as temp, open(temp, "wb") as out:
            _dump(flat, ctx, out)
        return target

    return multihost.written_by_primary(save, target)


def spell(path: Path, leaf: Leaf) -> str:
    return "/".join(_key(path, leaf))


def detect(obj: Any) -> float:
    """Sure for an existing `.msgpack` file, nearly so for bytes that open a msgpack map;
    never raises. Other files are read with `source="msgpack"`."""
    if isinstance(obj, bytes | bytearray):
        return 0.9 if obj[:1] and obj[0] in MAP_MARKERS else 0.0
    if not isinstance(obj, str | os.PathLike):
        return 0.0
    try:
        path = FilePath(os.fspath(obj))
        return 1.0 if path.suffix == SUFFIX and path.is_file() else 0.0
    except (OSError, TypeError, ValueError):
        return 0.0


register_format(
    "msgpack",
    detect=detect,
    read=read,
    write=write,
    description="Flax msgpack (flax.serialization.to_bytes): bytes, or a .msgpack file",
    spell=spell,
    options={"path", "overwrite"},
)
register_conversion("msgpack", "linen", cost=1.0)
register_conversion(
    "linen", "msgpack", cost=1.0, lossy=True, loses="Variable metadata (partitioning)"
)
register_conversion("msgpack", "nnx_state", cost=1.0)
register_conversion(
    "nnx_state",
    "msgpack",
    cost=1.0,
    lossy=True,
    loses="Variable metadata (partitioning), NNX RNG state",
    transform=drop_transient,
)
