"""safetensors: one `.safetensors` file, or a HuggingFace directory (`model.safetensors`, or
shards listed by `model.safetensors.index.json`).

A torch-layout format: keys are state_dict keys and tensors keep PyTorch's layout; layout
rules live elsewhere. Reading parses the headers here, not with the `safetensors`
package, whose numpy loader knows neither bfloat16 nor float8: it validates every
header completely before returning, and returns lazy arrays that read only the bytes an
index asks for, so reading needs neither torch nor the `safetensors` package. Writing
streams: the header is laid out as `safetensors.numpy.save_file` lays it out (the same
bytes, tested), then each tensor is made, written and released in turn, where `save_file`
needs every array of the file in memory at once. Shards are laid out as `transformers`'
`save_pretrained` lays them out, so `from_pretrained` loads the directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import re
import reprlib
import struct
from collections.abc import Callable, Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from bridge import multihost
from bridge.atomic import Temporary, atomic_output, fsync, make_directory, move, output_of, sweep
from bridge.errors import FormatError, OutputExistsError
from bridge.graph import Context, Description, register_conversion, register_format
from bridge.parallel import in_order, thread_count
from bridge.stream import items, parse_size
from bridge.tree import FlatState, LazyArray, Leaf, as_numpy, dotted, parse_dotted_keys

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FILE_METADATA = {"format": "pt"}
"""What `save_pretrained` stores in every file; `from_pretrained` expects it."""

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit, which also keeps a garbage length from making
us read a whole file as a header."""
MAX_DIMS = 64
"""The most axes numpy (and so every reader here) gives an array."""

DTYPES: dict[str, np.dtype] = {
    code: np.dtype(dtype)
    for code, dtype in {
        "BOOL": np.bool_,
        "U8": np.uint8,
        "I8": np.int8,
        "F8_E5M2": ml_dtypes.float8_e5m2,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E8M0": ml_dtypes.float8_e8m0fnu,
        "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
        "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
        "I16": np.int16,
        "U16": np.uint16,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "I32": np.int32,
        "U32": np.uint32,
        "F32": np.float32,
        "C64": np.complex64,
        "F64": np.float64,
        "I64": np.int64,
        "U64": np.uint64,
    }.items()
}
"""safetensors dtype codes and the numpy dtypes (ml_dtypes for bf16 and fp8) they hold, in
the order of the library's `Dtype` enum, by which it sorts a file's tensors."""
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_RANKS = {code: rank for rank, code in enumerate(DTYPES)}


class _MappedFile:
    """One safetensors file: where its data starts, its bytes memory-mapped on first use.

    The map is kept while any of the file's arrays lives, so reading many tensors maps
    the file once. The file's identity (device, inode, size, mtime) is recorded with the
    header; a file replaced before its first read is refused rather than read at the old
    header's offsets.
    """

    def __init__(self, path: Path, data_start: int, identity: tuple[int, ...]) -> None:
        self.path = path
        self.data_start = data_start
        self.identity = identity
        self._mapped: np.memmap | None = None

    def buffer(self) -> np.memmap:
        if self._mapped is None:
            with open(self.path, "rb") as handle:
                if _identity(os.fstat(handle.fileno())) != self.identity:
                    raise FormatError(
                        f"{self.path}: the file changed since its header was read; read it again"
                    )
                self._mapped = np.memmap(handle, dtype=np.uint8, mode="r")
        return self._mapped


bytes_read = 0
"""Bytes this process has taken out of safetensors files (the sizes of the slices
`SafetensorsArray.view` selected): how tests and benchmarks see that a sharded load, on
one host or many, reads only the slices its devices hold."""


class SafetensorsArray(LazyArray):
    """A tensor of a safetensors file, read on demand.

    `read(index)` copies only the bytes the index selects (a basic slice of the leading
    axis touches only its rows) out of the memory-mapped file. The result is always a
    fresh in-memory array: it stays valid when the file is later changed or removed, and
    it is writeable.
    """

    def __init__(
        self, file: _MappedFile, key: str, dtype: np.dtype, shape: tuple[int, ...], begin: int
    ) -> None:
        self.file = file
        self.key = key
        self.dtype = dtype
        self.shape = shape
        self.begin = begin

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, index: Any = ...) -> np.ndarray:
        return np.array(self.view(index))

    def view(self, index: Any = ...) -> np.ndarray:
        """The selected bytes in place in the map, read-only, copied by nobody: what a
        loader copies straight into device memory, sparing an in-memory copy."""
        global bytes_read
        start = self.file.data_start + self.begin
        raw = self.file.buffer()[start : start + self.nbytes]
        selected = raw.view(self.dtype).reshape(self.shape)[index]
        bytes_read += selected.nbytes
        return selected


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a key given twice is ambiguous, not "the last one wins"."""
    out = dict(pairs)
    if len(out) < len(pairs):  # rare: name the first key given again
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice")
            seen.add(key)
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json(data: bytes, file: Path, what: str) -> Any:
    """`data` parsed as JSON, keys unique; what is not JSON, or nests deeper than Python
    parses (a few KB of `[[[...`), is a `FormatError` naming `file` and `what` it is."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"{file}: {what} is not JSON ({exc})") from None
    except RecursionError:
        raise FormatError(f"{file}: {what} nests deeper than Python parses JSON") from None


def _shape_error(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why numpy, torch and jax cannot make an array of `shape` even with no data (at
    most 64 axes; the product of the non-zero dimensions, in bytes, an int64), or None."""
    if len(shape) > MAX_DIMS:
        return f"{len(shape)} dimensions, at most {MAX_DIMS} allowed"
    if math.prod(dim for dim in shape if dim) * dtype.itemsize >= 2**63:
        return "its dimensions multiply past 2**63 bytes"
    return None


class _Checked(NamedTuple):
    """One file's header, every rule checked: its tensors in file order, by column."""

    file: _MappedFile
    keys: list[str]
    dtypes: list[np.dtype]
    shapes: list[tuple[int, ...]]
    begins: list[int]
    ends: list[int]

    def arrays(self) -> dict[str, SafetensorsArray]:
        columns = zip(self.keys, self.dtypes, self.shapes, self.begins, strict=True)
        return {
            key: SafetensorsArray(self.file, key, dtype, shape, begin)
            for key, dtype, shape, begin in columns
        }

    def described(self) -> Iterator[Description]:
        sizes = map(operator.sub, self.ends, self.begins)
        return zip(self.keys, self.dtypes, self.shapes, sizes, strict=True)


def read_file(path: Path) -> dict[str, SafetensorsArray]:
    """The tensors of one file, in file order; every header rule checked first."""
    return _checked_file(path).arrays()


def _checked_file(path: Path) -> _Checked:
    """The header of the file at `path`, parsed, every rule checked."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        size = stat.st_size
        if size < 8:
            raise FormatError(
                f"{path}: {size} bytes, too short for the 8-byte header length at offset 0"
            )
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise FormatError(
                f"{path}: the header length at offset 0 says {header_len} bytes, but the file "
                f"has {size - 8} bytes after it (at most {MAX_HEADER_BYTES} allowed); "
                "the file is truncated or not safetensors"
            )
        header_bytes = handle.read(header_len)
    header = _json(header_bytes, path, f"the {header_len}-byte header at offset 8")
    if not isinstance(header, dict):
        raise FormatError(
            f"{path}: the header at offset 8 is a JSON {type(header).__name__}, expected an "
            'object {"key": {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}'
        )
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(
            f"{path}: __metadata__ must map strings to strings, got {reprlib.repr(metadata)}"
        )

    file = _MappedFile(path, 8 + header_len, _identity(stat))
    checked = _all_at_once(header, file, size)
    return checked if checked is not None else _one_by_one(header, file, size)


def _all_at_once(header: dict[str, Any], file: _MappedFile, size: int) -> _Checked | None:
    """The tensors in file order where every rule of `_one_by_one` holds, checked over all
    tensors at once (numpy, and Python's loops in C); None where any rule may fail, so
    that `_one_by_one` names the key, and where a tensor is empty (the rules and the order
    of tensors of no bytes are left to it). At 50,000 tensors this takes a third of the
    time of one tensor at a time."""
    infos = list(header.values())
    if not infos or set(map(type, infos)) != {dict}:
        return None
    try:
        codes, shapes, offsets = (
            list(map(operator.itemgetter(field), infos))
            for field in ("dtype", "shape", "data_offsets")
        )
    except KeyError:
        return None
    if not (
        set(map(type, codes)) == {str}
        and set(codes).issubset(DTYPES)
        and set(map(type, shapes)) == set(map(type, offsets)) == {list}
        and set(map(len, offsets)) == {2}
        and max(map(len, shapes)) <= MAX_DIMS
    ):
        return None
    dims, bounds = list(chain.from_iterable(shapes)), list(chain.from_iterable(offsets))
    if not (
        set(map(type, dims)) <= {int}  # not bool, float, ...
        and set(map(type, bounds)) == {int}
        and min(dims, default=0) >= 0
        and min(bounds) >= 0
    ):
        return None
    try:  # an int past int64 is no size or offset of a file
        sizes = np.fromiter(map(math.prod, shapes), np.int64, len(shapes))
        begins, ends = np.array(bounds, np.int64).reshape(-1, 2).T
    except OverflowError:
        return None
    itemsize = {code: DTYPES[code].itemsize for code in set(codes)}
    counts, rest = np.divmod(ends - begins, np.fromiter(map(itemsize.get, codes), np.int64))
    order = np.argsort(begins, kind="stable")
    if not (
        sizes.all()
        and (counts == sizes).all()
        and not rest.any()
        and begins[order[0]] == 0
        and (begins[order[1:]] == ends[order[:-1]]).all()
        and ends[order[-1]] == size - file.data_start
    ):
        return None
    keys, ordered = list(header), order.tolist()
    return _Checked(
        file,
        [keys[i] for i in ordered],
        [DTYPES[codes[i]] for i in ordered],
        [tuple(shapes[i]) for i in ordered],
        begins[order].tolist(),
        ends[order].tolist(),
    )


def _one_by_one(header: dict[str, Any], file: _MappedFile, size: int) -> _Checked:
    """The tensors in file order, each tensor checked in header order, then their packing:
    the first rule that fails is a `FormatError` naming the key, the rule and the bytes."""
    path, data_start = file.path, file.data_start
    data_len = size - data_start
    dtypes: dict[str, np.dtype] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        where = f"{path}: tensor {key!r}"
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(_is_count(dim) for dim in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(_is_count(offset) for offset in info["data_offsets"])
        ):
            raise FormatError(
                f"{where}: expected {{dtype: str, shape: [int >= 0, ...], data_offsets: "
                f"[begin, end]}}, got {reprlib.repr(info)}"
            )
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise FormatError(
                f"{where}: unsupported dtype {reprlib.repr(info['dtype'])}; known: "
                f"{', '.join(DTYPES)}"
            )
        shape = tuple(info["shape"])
        if reason := _shape_error(shape, dtype):
            raise FormatError(f"{where}: shape {reprlib.repr(info['shape'])} has {reason}")
        begin, end = info["data_offsets"]
        expected = math.prod(shape) * dtype.itemsize
        if end > data_len:
            raise FormatError(
                f"{where}: data_offsets [{begin}, {end}] (file bytes {data_start + begin} to "
                f"{data_start + end}) run out of the file ({size} bytes); the file is truncated"
            )
        if end - begin != expected:
            raise FormatError(
                f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but "
                f"{info['dtype']} {list(shape)} needs {expected}"
            )
        dtypes[key], shapes[key] = dtype, shape
        spans.append((begin, end, key))
    spans.sort()
    _check_packing(path, spans, data_start, data_len)
    keys = [key for _, _, key in spans]
    return _Checked(
        file,
        keys,
        [dtypes[key] for key in keys],
        [shapes[key] for key in keys],
        [begin for begin, _, _ in spans],
        [end for _, end, _ in spans],
    )


def _check_packing(
    path: Path, spans: list[tuple[int, int, str]], data_start: int, data_len: int
) -> None:
    """Tensors must tile the data section exactly, as the safetensors library requires:
    an overlap means two tensors share bytes, a gap or a tail means a damaged header."""
    position, previous = 0, None
    for begin, end, key in spans:
        if begin < position:
            raise FormatError(
                f"{path}: tensor {key!r} at data_offsets [{begin}, {end}] overlaps tensor "
                f"{previous!r}, which ends at {position} (file byte {data_start + position})"
            )
        if begin > position:
            raise FormatError(
                f"{path}: tensor {key!r} starts at data offset {begin}, expected {position} "
                f"(file byte {data_start + position}): {begin - position} bytes belong to no tensor"
            )
        position, previous = end, key
    if position != data_len:
        raise FormatError(
            f"{path}: the tensors end at data offset {position} (file byte "
            f"{data_start + position}), but the file goes on for {data_len - position} more bytes"
        )


def _read_index(directory: Path) -> dict[str, SafetensorsArray]:
    """The tensors of a sharded directory; the index and every shard must agree exactly."""
    index_path = directory / INDEX_FILE
    index = _json(index_path.read_bytes(), index_path, "the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and Path(name).name == name for name in weight_map.values()
    ):
        raise FormatError(
            f'{index_path}: expected {{"weight_map": {{"key": "shard file name"}}}}, '
            "shard names without directories"
        )
    shards: dict[str, dict[str, SafetensorsArray]] = {}
    for name in dict.fromkeys(weight_map.values()):
        if not (directory / name).is_file():
            listed = [key for key, shard in weight_map.items() if shard == name]
            raise FormatError(
                f"{index_path}: shard {name!r} does not exist in {directory} "
                f"(it should hold {len(listed)} tensors, e.g. {listed[0]!r})"
            )
        shards[name] = read_file(directory / name)
    tensors: dict[str, SafetensorsArray] = {}
    for name, shard in shards.items():
        for key, array in shard.items():
            listed = weight_map.get(key)
            if listed is None:
                raise FormatError(
                    f"{directory / name}: tensor {key!r} is in this shard but not in {INDEX_FILE}"
                )
            if listed != name and key in shards[listed]:
                raise FormatError(
                    f"{index_path}: tensor {key!r} is in both {listed!r} and {name!r}"
                )
            if listed != name:
                raise FormatError(
                    f"{directory / name}: tensor {key!r} is in this shard, but {INDEX_FILE} "
                    f"puts it in {listed!r}"
                )
            tensors[key] = array
    if missing := [key for key in weight_map if key not in tensors]:
        raise FormatError(
            f"{index_path}: tensor {missing[0]!r} is listed in shard {weight_map[missing[0]]!r} "
            f"but is not in it ({len(missing)} listed tensors missing)"
        )
    return tensors


def _tensors(obj: str | os.PathLike[str], ctx: Context) -> dict[str, SafetensorsArray]:
    """The tensors of a file or a HF directory by key; nothing is read but headers. A
    directory holding both layouts is read as `from_pretrained` reads it:
    `model.safetensors` first."""
    path = Path(os.fspath(obj))
    if path.is_dir():
        if (path / SINGLE_FILE).is_file():
            if (path / INDEX_FILE).exists():
                ctx.report.notes.append(
                    f"{path} holds both {SINGLE_FILE} and {INDEX_FILE}; read {SINGLE_FILE}, "
                    "as transformers' from_pretrained does"
                )
            return read_file(path / SINGLE_FILE)
        if (path / INDEX_FILE).is_file():
            return _read_index(path)
        raise FormatError(f"{path}: a directory with neither {SINGLE_FILE} nor {INDEX_FILE}")
    if path.is_file():
        return read_file(path)
    raise FormatError(f"{path}: no such file or directory")


def read(obj: str | os.PathLike[str], ctx: Context) -> FlatState:
    """A file or a HF directory -> `{path: Leaf(SafetensorsArray)}`."""
    tensors = _tensors(obj, ctx)
    return dict(zip(parse_dotted_keys(tensors), map(Leaf, tensors.values()), strict=True))


def describe(obj: str | os.PathLike[str], ctx: Context) -> Iterator[Description]:
    """Each tensor's key, dtype, shape and bytes, for `bridge.inspect`: the checks of
    `read`, without a path and a leaf per tensor; a file's straight from its header."""
    path = Path(os.fspath(obj))
    if path.is_file():
        return _checked_file(path).described()
    tensors = _tensors(path, ctx)
    return ((key, t.dtype, t.shape, t.nbytes) for key, t in tensors.items())


def _code_of(dtype: Any) -> str | None:
    """The safetensors code of a dtype, whatever its byte order; None if it has none."""
    try:
        return _CODES.get(np.dtype(dtype).newbyteorder("<"))
    except TypeError:  # not a numpy dtype (a PRNG key type, an arbitrary object)
        return None


def _checked(flat: FlatState) -> dict[str, Leaf]:
    """`{key: leaf}`, refusing before any output exists what cannot be written."""
    leaves: dict[str, Leaf] = {}
    for path, leaf in flat.items():
        key = dotted(path)
        if key in leaves:
            raise FormatError(f"two leaves are spelled {key!r} in safetensors; rename one")
        if key == "__metadata__":
            raise FormatError("a tensor cannot be named '__metadata__' in safetensors; rename it")
        try:
            key.encode()
        except UnicodeEncodeError as exc:
            raise FormatError(f"{key!r} is no valid UTF-8 name for a safetensors header") from exc
        if leaf.is_abstract:
            raise FormatError(f"{key!r} is abstract ({leaf.value}); it has no data to write")
        try:
            dtype = leaf.dtype
        except (TypeError, ValueError) as exc:
            raise FormatError(f"{key!r}: {type(leaf.value).__name__} is not an array") from exc
        if _code_of(dtype) is None:
            raise FormatError(
                f"{key!r}: safetensors cannot hold dtype {dtype}; known: "
                f"{', '.join(str(d) for d in DTYPES.values())}"
            )
        leaves[key] = leaf
    return leaves


def _little_endian(key: str, leaf: Leaf) -> np.ndarray:
    """The C-contiguous little-endian array of `leaf`, copied only where needed, checked
    against the shape and dtype the header already promised."""
    array = as_numpy(key, leaf.value)
    code = _code_of(array.dtype)
    if code is None:
        raise FormatError(f"{key!r}: safetensors cannot hold dtype {array.dtype}")
    if array.shape != leaf.shape or code != _code_of(leaf.dtype):
        raise FormatError(
            f"{key!r}: the value read is {array.dtype}{list(array.shape)}, but the leaf "
            f"said {leaf.dtype}{list(leaf.shape)}"
        )
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def _header(leaves: Mapping[str, Leaf]) -> tuple[bytes, list[str]]:
    """The encoded header and the keys in data order, byte for byte as the library's
    `prepare` makes them: tensors sorted by descending dtype rank then name, compact
    JSON, padded with spaces to a multiple of 8 bytes."""
    codes = {key: _code_of(leaf.dtype) for key, leaf in leaves.items()}
    order = sorted(leaves, key=lambda key: (-_RANKS[codes[key]], key))
    entries: dict[str, Any] = {"__metadata__": FILE_METADATA}
    offset = 0
    for key in order:
        size = leaves[key].nbytes
        entries[key] = {
            "dtype": codes[key],
            "shape": [int(dim) for dim in leaves[key].shape],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, order


def _saver(shards: Mapping[str, Mapping[str, Leaf]], ctx: Context) -> Callable[[str, Path], None]:
    """`save(name, file)` writes shard `name` into `file`: the header first (shapes and
    dtypes are known without the data), then each tensor's bytes in header order. The
    shards are read as one stream, in batches, under one bar. From memory, with
    `threads=`, the next tensors' bytes (host copies, transposes, byte order) are made on
    that many threads while one is written, `threads + 1` at most in memory; converting a
    file (its batches fetched together) or under `jax.distributed` (process 0's reads
    are gathers the others serve one by one), one at a time."""
    headers = {name: _header(leaves) for name, leaves in shards.items()}
    keyed = {(key,): shards[name][key] for name, (_, order) in headers.items() for key in order}
    alone = ctx.streaming or multihost.processes() > 1
    tensors = in_order(
        lambda item: _little_endian(item[0][0], item[1]),
        items(keyed, ctx, "saving"),
        1 if alone else thread_count(ctx.options),
    )

    def save(name: str, file: Path) -> None:
        header, order = headers.pop(name)
        with open(file, "wb") as out:
            out.write(header)
            for _ in order:
                out.write(next(tensors)[1].reshape(-1).view(np.uint8))  # then let go
        if not headers:
            next(tensors, None)  # the end of the stream: its bar completes

    return save


def shard_layout(sizes: Mapping[str, int], max_shard_size: float) -> dict[str, list[str]]:
    """`{file name: keys}` exactly as `huggingface_hub.split_state_dict_into_shards_factory`
    (which `save_pretrained` uses) splits: greedy in key order, a tensor larger than the
    limit alone in its own shard, `model.safetensors` when one shard suffices."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for key, size in sizes.items():
        if size > max_shard_size:
            shards.append([key])
            continue
        if current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {
        f"model-{number:05d}-of-{len(shards):05d}.safetensors": keys
        for number, keys in enumerate(shards, start=1)
    }


_ENTRIES = (SINGLE_FILE, INDEX_FILE)
"""What a loader opens first in a directory, in this order."""
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
"""The shard names `save_pretrained` writes, bridge too."""


def write(flat: FlatState, ctx: Context) -> Path:
    """Write `ctx.options["path"]`: a `.safetensors` file (atomic; an existing one is
    replaced only with `overwrite=True`), else the weights of a HF directory, sharded by
    `max_shard_size`, as `_write_directory` says. Under `jax.distributed` process 0
    writes, gathering one array at a time (`multihost.written_by_primary`)."""
    if ctx.options.get("path") is None:
        raise FormatError("writing safetensors needs path=... (a .safetensors file or a directory)")
    target = Path(os.fspath(ctx.options["path"]))
    return multihost.written_by_primary(lambda: _write(flat, ctx, target), target)


def _write(flat: FlatState, ctx: Context, target: Path) -> Path:
    overwrite = bool(ctx.options.get("overwrite"))
    max_shard_size = ctx.options.get("max_shard_size")
    leaves = _checked(flat)
    if target.name.endswith(".safetensors"):
        if max_shard_size is not None:
            raise FormatError(
                f"{target}: max_shard_size shards into a directory; give a directory path"
            )
        with atomic_output(target, overwrite=overwrite) as temp:
            _saver({SINGLE_FILE: leaves}, ctx)(SINGLE_FILE, temp)
        if ctx.companions:
            companions = ", ".join(ctx.companions)
            ctx.report.notes.append(f"{target}: one file; {companions} go only into a directory")
        return target

    sizes = {key: leaf.nbytes for key, leaf in leaves.items()}
    limit = math.inf if max_shard_size is None else parse_size(max_shard_size, "max_shard_size")
    layout = shard_layout(sizes, limit)
    if os.path.lexists(target):
        sweep(target.parent, lambda output: output == target.name)  # of a new directory's save
        _write_directory(target, layout, leaves, ctx, overwrite)
        _write_companions(target, ctx, overwrite)
    else:  # a new directory appears whole, or not at all
        with atomic_output(target, directory=True) as built:
            built.mkdir()
            _write_directory(built, layout, leaves, ctx, overwrite=False)
            _write_companions(built, ctx, overwrite=False)
    return target


def _write_companions(directory: Path, ctx: Context, overwrite: bool) -> None:
    """The files the template gives beside the weights (`config.json`), each atomic; one
    already there is kept unless `overwrite`, and the report says so."""
    for name, data in ctx.companions.items():
        path = directory / name
        if os.path.lexists(path) and not overwrite:
            ctx.report.notes.append(f"{path}: kept; overwrite=True replaces it with the template's")
            continue
        with atomic_output(path, overwrite=True) as temp:
            temp.write_bytes(data)


def _write_directory(
    directory: Path,
    layout: dict[str, list[str]],
    leaves: Mapping[str, Leaf],
    ctx: Context,
    overwrite: bool,
) -> None:
    """Write weights into `directory` as `save_pretrained` does: weight files and index
    replaced, weight files of a previous save that this one does not write removed, every
    other file (config, tokenizer, README, subfolders) kept. Weights already there are
    replaced only with `overwrite`; a directory without weights needs none.

    At every instant the directory loads the old weights or the new ones, never a mix.
    Every file is complete on disk under a temporary name before the first one moves,
    and what loads is decided by one entry: `model.safetensors`, which loaders read
    first, else the index. So a single file lands in one rename; shards go first, then the
    index, then a `model.safetensors` in the way is removed; stale shards go last. Where
    the index in place lists a shard name this save rewrites, an index of the new shards
    under their temporary names replaces it first; the shards then get their own names
    as hard links, and the final index replaces the temporary one. Without hard links the
    shards are renamed instead, and for that moment the directory refuses to load (its
    index lists a missing file). A failure after that first index leaves the new weights
    loading from their temporary names, which the next save removes.
    """
    make_directory(directory)
    present = _weight_files(directory)
    if present and not overwrite:
        shown = ", ".join(sorted(present)[:3]) + (", ..." if len(present) > 3 else "")
        raise OutputExistsError(
            f"{directory} holds weights ({shown}); pass overwrite=True to replace them"
        )
    loaded = _loaded_files(directory)
    sweep(directory, _is_weight_file, keep=loaded)
    weight_map = {key: name for name, keys in layout.items() for key in keys}
    total = sum(leaves[key].nbytes for key in weight_map)
    save = _saver({name: {key: leaves[key] for key in keys} for name, keys in layout.items()}, ctx)
    with contextlib.ExitStack() as stack:
        temps = {name: stack.enter_context(Temporary(directory, name)) for name in layout}
        for name in layout:
            save(name, temps[name].path)
            fsync(temps[name].path)
        if len(layout) == 1:
            move(temps[SINGLE_FILE].path, directory / SINGLE_FILE, replace=overwrite)
        else:
            index = stack.enter_context(Temporary(directory, INDEX_FILE))
            _write_index(index.path, weight_map, total)
            if loaded.intersection(layout):
                staged = stack.enter_context(Temporary(directory, INDEX_FILE))
                _write_index(
                    staged.path, {k: temps[n].path.name for k, n in weight_map.items()}, total
                )
                os.replace(staged.path, directory / INDEX_FILE)
                for temp in temps.values():
                    temp.kept = True  # the index in place lists them
                fsync(directory)
                for name, temp in temps.items():
                    _link_or_rename(temp.path, directory / name)
            else:
                for name, temp in temps.items():
                    move(temp.path, directory / name, replace=overwrite)
            fsync(directory)  # the shards' names are on disk before the index that lists them
            move(index.path, directory / INDEX_FILE, replace=overwrite)
            for temp in temps.values():
                if temp.kept:
                    temp.path.unlink(missing_ok=True)
        fsync(directory)
        written = set(layout) | ({INDEX_FILE} if len(layout) > 1 else set())
        for name in sorted(present - written, key=lambda name: name not in _ENTRIES):
            (directory / name).unlink(missing_ok=True)  # the entries first: they decide
    fsync(directory)


def _is_weight_file(name: str) -> bool:
    """A name a save into a directory writes: the single file, the index, a shard."""
    return name in _ENTRIES or SHARD_NAME.fullmatch(name) is not None


def _listed(directory: Path) -> set[str]:
    """The files the index in `directory` lists that may be weight files (`.safetensors`
    names, bridge's temporaries of shards). Read leniently: what it lists is only ever
    removed along with the index, and only if it is such a file."""
    try:
        index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        names = set(index["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {
        name
        for name in names
        if isinstance(name, str)
        and Path(name).name == name
        and (name.endswith(".safetensors") or _is_weight_file(output_of(name) or ""))
    }


def _weight_files(directory: Path) -> set[str]:
    """The files a save into `directory` replaces or removes: the single file, the index,
    shards by their `save_pretrained` names and whatever else the index lists."""
    names = {name for name in os.listdir(directory) if _is_weight_file(name)}
    return {
        name
        for name in names | _listed(directory)
        if (directory / name).is_symlink() or (directory / name).is_file()
    }


def _loaded_files(directory: Path) -> set[str]:
    """The files a loader reads in `directory` now: `model.safetensors` alone if there is
    one, else the index and what it lists."""
    if (directory / SINGLE_FILE).is_file():
        return {SINGLE_FILE}
    if (directory / INDEX_FILE).is_file():
        return {INDEX_FILE, *_listed(directory)}
    return set()


def _write_index(path: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fsync(path)


def _link_or_rename(temp: Path, final: Path) -> None:
    """Give `temp`'s file the name `final` too, where no index in place lists `final`;
    renamed instead of linked where the filesystem has no hard links."""
    final.unlink(missing_ok=True)
    try:
        os.link(temp, final)
    except OSError:
        os.replace(temp, final)


def detect(obj: Any) -> float:
    """Sure for an existing `.safetensors` file or a HF directory holding one; never raises."""
    if not isinstance(obj, str | os.PathLike):
        return 0.0
    try:
        path = Path(os.fspath(obj))
        if path.is_file():
            return 1.0 if path.name.endswith(".safetensors") else 0.0
        if path.is_dir():
            return 1.0 if (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file() else 0.0
    except (OSError, TypeError, ValueError):
        pass
    return 0.0


register_format(
    "safetensors",
    detect=detect,
    read=read,
    write=write,
    describe=describe,
    description="a .safetensors file, or a HF directory (model.safetensors or sharded + index)",
    options={"path", "overwrite", "max_shard_size", "config"},
    checkpoint_files=True,
)
register_conversion("safetensors", "torch", cost=1.0)
register_conversion("torch", "safetensors", cost=1.0, needs={"path"})
