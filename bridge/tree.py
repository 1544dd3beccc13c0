"""Flat paths and leaves: the one internal representation every format converts through.

A state is a flat mapping `path -> Leaf`; a path is a tuple of `str` and `int` parts,
spelled the NNX way (`("layers", 0, "kernel")`). The spellings of the other formats
(torch's dotted keys, Linen's `layers_0`) are converted here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta
from flax.nnx import variablelib

from bridge.errors import FormatError

Path = tuple[str | int, ...]

SHARDING = "out_sharding"
"""Canonical metadata key for partition / logical axis names (Flax's current spelling)."""
LEGACY_SHARDING_KEYS = ("sharding_names", "sharding")
SHARDING_RULES = "sharding_rules"
MESH = "mesh"


class LazyArray:
    """Array data read only when asked: a tensor in a file, a transform of another array.

    Subclasses give `shape`, `dtype` and `read(index)`, which reads just the bytes the
    index needs. numpy and jax take a lazy array through `__array__`, so writers need no
    special case, and plans can describe leaves without reading them.
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, index: Any = ...) -> np.ndarray:
        raise NotImplementedError

    def view(self, index: Any = ...) -> np.ndarray:
        """Like `read`, but may return memory the array does not own (a file's map),
        valid only while the source is unchanged: for copying straight to a device."""
        return self.read(index)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.read(index)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


@dataclasses.dataclass(frozen=True, eq=False)
class Derived(LazyArray):
    """`fn(*sources)` computed only when read: plans describe it without moving data."""

    sources: tuple[Any, ...]
    fn: Callable[..., np.ndarray]
    shape: tuple[int, ...]
    dtype: Any

    def read(self, index: Any = ...) -> np.ndarray:
        return np.asarray(self.fn(*(read_slice(source) for source in self.sources)))[index]


@dataclasses.dataclass(frozen=True, eq=False)
class Transposed(LazyArray):
    """`source.transpose(axes)`, read through the permuted index: a device that holds a
    slice of the result reads only the matching slice of the source (of a file, say)."""

    source: Any
    axes: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(np.shape(self.source)[axis] for axis in self.axes)

    @property
    def dtype(self) -> Any:  # type: ignore[override]
        return self.source.dtype

    def read(self, index: Any = ...) -> np.ndarray:
        return np.array(self.view(index))

    def view(self, index: Any = ...) -> np.ndarray:
        source_index: Any = ...
        if index is not Ellipsis and index != ():
            index = tuple(index) + (slice(None),) * (len(self.axes) - len(tuple(index)))
            source_index = [slice(None)] * len(self.axes)
            for position, axis in enumerate(self.axes):
                source_index[axis] = index[position]
            source_index = tuple(source_index)
        return np.asarray(read_slice(self.source, source_index, view=True)).transpose(self.axes)


@dataclasses.dataclass(frozen=True, eq=False)
class Cast(LazyArray):
    """`source` as another dtype, converted slice by slice as it is read."""

    source: Any
    dtype: Any

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(np.shape(self.source))

    def read(self, index: Any = ...) -> np.ndarray:
        return np.asarray(read_slice(self.source, index)).astype(self.dtype)


def _on_cpu(array: jax.Array) -> jax.Array:
    """A one-device array on the CPU device (a copy if elsewhere), where `np.asarray` is a
    view of its buffer; as it is without a CPU backend."""
    if next(iter(array.devices())).platform == "cpu":
        return array
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return array
    return jax.device_put(array, cpu)


def host_array(value: Any) -> np.ndarray:
    """`np.asarray(value)`, but a jax array is copied to the host shard by shard.

    `np.asarray` of an array on an accelerator or over several devices keeps the host
    copy it makes on the array (jax's `_npy_value`, also made by `device_put` to one
    device) for as long as the array lives: an export would end holding a host copy of
    the whole model. Copied here, the host copy is the caller's, gone once written."""
    if not isinstance(value, jax.Array) or not value.is_fully_addressable:
        return np.asarray(value)
    if value.is_fully_replicated:
        return np.asarray(_on_cpu(value.addressable_data(0)))
    out = np.empty(value.shape, value.dtype)
    for shard in value.addressable_shards:
        if shard.replica_id == 0:
            out[shard.index] = np.asarray(_on_cpu(shard.data))
    return out


def read_slice(value: Any, index: Any = ..., *, view: bool = False) -> Any:
    """`value[index]`, reading only that slice where `value` is lazy; with `view=True`
    possibly memory it does not own (see `LazyArray.view`)."""
    if isinstance(value, LazyArray):
        return value.view(index) if view else value.read(index)
    array = host_array(on_this_process(value))
    return array[index] if index is not Ellipsis else array


def on_this_process(value: Any, where: str = "an array") -> Any:
    """`value`, unless it is a jax array with shards on other processes, which one process
    cannot read alone: then a `FormatError` saying what can (a save every process makes)."""
    spans = isinstance(value, jax.Array) and not value.is_fully_addressable
    if spans and not value.is_fully_replicated:
        raise FormatError(
            f"{where} of shape {value.shape} spans processes ({value.sharding}); no "
            "process can read it alone: save it with bridge.save(...) called on every "
            "process, or gather it first (jax.experimental.multihost_utils.process_allgather)"
        )
    return value


def split(value: Any, parts: int, index: int, axis: int = 0) -> Derived:
    """Part `index` of `parts` equal slices of `value` along `axis`, lazily."""
    shape = list(np.shape(value))
    shape[axis] //= parts
    step = shape[axis]
    take = [slice(None)] * len(shape)
    take[axis] = slice(index * step, (index + 1) * step)
    return Derived((value,), lambda array: array[tuple(take)], tuple(shape), value.dtype)


def concatenate(values: list[Any], axis: int = 0) -> Derived:
    """`values` joined along `axis`, lazily (the inverse of `split`)."""
    shape = list(np.shape(values[0]))
    shape[axis] = sum(np.shape(value)[axis] for value in values)
    return Derived(
        tuple(values),
        lambda *arrays: np.concatenate(arrays, axis=axis),
        tuple(shape),
        values[0].dtype,
    )


def stack(values: list[Any], axis: int = 0) -> Derived:
    """`values` stacked along a new `axis`, lazily (per-layer tensors -> a scanned one)."""
    shape = list(np.shape(values[0]))
    shape.insert(axis if axis >= 0 else len(shape) + 1 + axis, len(values))
    return Derived(
        tuple(values), lambda *arrays: np.stack(arrays, axis=axis), tuple(shape), values[0].dtype
    )


def take(value: Any, index: int, axis: int = 0) -> Derived:
    """Slice `index` of `value` along `axis`, lazily (the inverse of `stack`)."""
    shape = list(np.shape(value))
    del shape[axis]
    return Derived(
        (value,), lambda array: np.take(array, index, axis=axis), tuple(shape), value.dtype
    )


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array of a state, with what its format knows about it.

    `value` is an array (jax or numpy), a `LazyArray`, or an abstract
    `jax.ShapeDtypeStruct`; it is never copied when only the wrapping changes.
    `kind` is the Linen collection name, which names the NNX Variable type through
    Flax's registry (None when the format has no such notion).
    `metadata` is NNX-style Variable metadata, the sharding key spelled `out_sharding`.
    `transient` marks state a format re-creates rather than stores (NNX RNG state).
    `module` names the family of the module owning the leaf, when the format knows it.
    `alias_of` is the path of another leaf holding the same tensor (tied weights).
    `source` and `transform` record provenance for plans.
    """

    value: Any
    kind: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    transient: bool = False
    module: str | None = None
    alias_of: Path | None = None
    source: str = ""
    transform: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        shape = getattr(self.value, "shape", None)
        return tuple(shape) if shape is not None else np.shape(self.value)

    @property
    def dtype(self) -> Any:
        dtype = getattr(self.value, "dtype", None)
        return dtype if dtype is not None else np.asarray(self.value).dtype

    @property
    def nbytes(self) -> int:
        try:
            itemsize = np.dtype(self.dtype).itemsize
        except TypeError:  # extended dtypes (PRNG keys) have no numpy counterpart
            itemsize = getattr(self.dtype, "itemsize", 0)
        return int(math.prod(self.shape)) * itemsize

    @property
    def is_abstract(self) -> bool:
        """True for a placeholder (`ShapeDtypeStruct`) that holds no data."""
        return isinstance(self.value, jax.ShapeDtypeStruct)

    def replace(self, **changes: Any) -> Leaf:
        """A copy with `changes`, as `dataclasses.replace` makes it at a fraction of its
        cost (a leaf is copied several times on its way through a conversion)."""
        if unknown := changes.keys() - _LEAF_FIELDS:
            raise TypeError(f"Leaf has no field(s) {sorted(unknown)}")
        copy = object.__new__(Leaf)
        copy.__dict__.update(self.__dict__, **changes)
        return copy


_LEAF_FIELDS = frozenset(field.name for field in dataclasses.fields(Leaf))


FlatState = dict[Path, Leaf]


def jax_narrows(dtype: Any) -> bool:
    """Whether JAX would store `dtype` narrower than it is: int64, uint64, float64 and
    complex128 while `jax_enable_x64` is off (JAX's default)."""
    try:
        return jax.dtypes.canonicalize_dtype(np.dtype(dtype)) != np.dtype(dtype)
    except TypeError:  # not a numpy dtype (a PRNG key type)
        return False


def narrower(source: Any, target: Any) -> bool:
    """Whether `target` is `source` at half the width, same kind (int64 -> int32,
    float64 -> float32): the narrowing a 32-bit template may ask for, values checked."""
    try:
        source, target = np.dtype(source), np.dtype(target)
    except TypeError:
        return False
    return (
        source.kind == target.kind
        and source.kind in "iuf"
        and target.itemsize * 2 == source.itemsize
        and source.itemsize >= 8
    )


def changed_by(value: Any, dtype: Any) -> tuple[int, ...] | None:
    """The index of the first element that `value` as `dtype` would not hold exactly
    (compared bit for bit after the round trip, so NaN payloads and -0.0 count); None
    when every element survives."""
    array = np.asarray(read_slice(value))
    back = array.astype(dtype).astype(array.dtype)
    raw = f"u{array.dtype.itemsize}"
    differs = array.view(raw) != back.view(raw)
    return tuple(int(i) for i in np.argwhere(differs)[0]) if differs.any() else None


def to_jax(value: Any, where: str, sharding: jax.sharding.Sharding | None = None) -> Any:
    """A leaf value as the Flax formats hold it: placeholders unchanged, jax arrays moved
    only to a `sharding` they are not on (jax reshards them, across processes too), numpy
    and lazy arrays read and put on the default device; with a sharding over several
    devices, each distinct slice this process's devices hold is read once and placed, so
    a device never receives (and a lazy file never gives) more than its shard; a shape
    the sharding does not divide is a `FormatError` (JAX holds no uneven shards). A 64-bit value
    that JAX would narrow (x64 off) stays a numpy array on the host, never narrowed.
    `where` names the leaf in the `FormatError` for a value that is not numbers
    (`native_numbers`)."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return value
    dtype = getattr(value, "dtype", None)
    if jax_narrows(dtype if dtype is not None else np.asarray(value).dtype):
        return native_numbers(np.array(read_slice(value)), where)
    if isinstance(value, jax.Array):  # resharded by jax (across processes, too) if need be
        if sharding is None or value.sharding.is_equivalent_to(sharding, value.ndim):
            return value
        return jax.device_put(value, sharding)
    if sharding is not None and len(sharding.device_set) > 1:
        shape = tuple(np.shape(value))
        # devices holding the same slice share a read
        slices: dict[tuple[Any, ...], np.ndarray] = {}

        def read(index: tuple[slice, ...]) -> np.ndarray:
            key = tuple((part.start, part.stop, part.step) for part in index)
            if key not in slices:
                slices[key] = _unaliased(native_numbers(read_slice(value, index, view=True), where))
            return slices[key]

        try:
            sharding.shard_shape(shape)
        except ValueError as exc:  # JAX places no uneven shards from host data
            raise FormatError(
                f"{where}: shape {shape} cannot be placed on {sharding}: {exc}"
            ) from None
        return jax.make_array_from_callback(shape, sharding, read)
    array = native_numbers(read_slice(value, view=True), where)
    # A contiguous view of a file's map must be copied (jax would alias it on the CPU);
    # a strided one (a transposed kernel) `device_put` copies in one pass, where
    # `jnp.array` makes a contiguous copy first, but at twice `jnp.array`'s cost per
    # call: it pays only for large arrays.
    if array.flags.c_contiguous or array.nbytes <= STAGED_BYTES:
        placed = jnp.array(array, copy=True)
    else:
        placed = jax.device_put(array)
    # one large tensor at a time: queued transfers would each hold a staging copy
    # meanwhile; a small one's is at most `STAGED_BYTES` (and on the CPU placed already)
    return placed.block_until_ready() if array.nbytes > STAGED_BYTES else placed


STAGED_BYTES = 1 << 16
"""Strided arrays up to this size are placed through a contiguous staging copy."""


def _unaliased(array: np.ndarray) -> np.ndarray:
    """What jax may take without copying: on the CPU it aliases a contiguous numpy
    buffer, which must not be a file's map; a strided view it copies anyway."""
    return np.array(array) if array.flags.c_contiguous else array


def native_numbers(value: Any, where: str) -> np.ndarray:
    """`value` as jax and torch take it: a numpy array of numbers (bool, int, float,
    complex, bf16 / fp8) in native byte order; a big-endian array is converted (same
    values). Strings, bytes, dates and objects are a `FormatError` naming `where`."""
    array = np.asarray(on_this_process(value, where))
    canonical = _canonical(array.dtype.type)
    if canonical is None:
        raise FormatError(
            f"{where}: {reprlib.repr(value)} is of dtype {array.dtype}, where an array of "
            "numbers is expected"
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array if array.dtype.type is canonical.type else array.view(canonical)


@functools.cache
def _canonical(scalar_type: type) -> np.dtype | None:
    """numpy's canonical dtype of a type of numbers, None for other types (strings,
    dates, objects); asked once per type, not per array. `np.asarray(2**63)` is a
    `ulonglong`, which torch refuses, where the same `uint64` it takes."""
    dtype = np.dtype(scalar_type)
    if not (jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_):
        return None
    return np.dtype(dtype.str) if dtype.kind in "biufc" else dtype


CASTINGS = ("same_kind", "unsafe")
"""`convert(..., casting=)`: numpy's names for the casts `dtype=` may make."""


def cast_target(dtype: Any, casting: str = "same_kind") -> np.dtype:
    """The dtype `convert(..., dtype=, casting=)` casts floating-point leaves to: a
    floating one, unless `casting="unsafe"` asks for an integer or bool one (a cast that
    rounds, wraps or truncates values is never made by mistake)."""
    if casting not in CASTINGS:
        raise FormatError(f"casting={casting!r}: expected one of {', '.join(CASTINGS)}")
    try:
        target = np.dtype(jnp.dtype(dtype))
    except TypeError as exc:
        raise FormatError(f"dtype={dtype!r}: not a dtype ({exc})") from None
    if not jnp.issubdtype(target, jnp.floating) and casting != "unsafe":
        raise FormatError(
            f"dtype={dtype!r}: dtype= casts floating-point leaves to another floating type; "
            f"a cast to {target} does not keep their values, pass casting='unsafe' to ask for it"
        )
    return target


def cast_floating(flat: FlatState, target: np.dtype) -> FlatState:
    """Every floating-point leaf as `target` (see `cast_target`), lazily."""
    return {
        path: leaf.replace(
            value=Cast(leaf.value, target),
            transform=f"{leaf.transform}, cast {target}".lstrip(", "),
        )
        if jnp.issubdtype(leaf.dtype, jnp.floating)
        and leaf.dtype != target
        and not leaf.is_abstract
        else leaf
        for path, leaf in flat.items()
    }


def _installed_sharding_key() -> str:
    """The partitioning key of the installed Flax, as Flax's own Linen box reports it."""
    probe = meta.Partitioned(None, names=()).to_nnx_metadata()
    return next(key for key in (SHARDING, *LEGACY_SHARDING_KEYS) if key in probe)


FLAX_SHARDING = _installed_sharding_key()


def normalize_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical metadata: the partitioning key spelled `out_sharding` whatever Flax
    version wrote it, and no `mesh: None` (it says nothing)."""
    out = dict(metadata)
    for legacy in LEGACY_SHARDING_KEYS:
        if legacy in out:
            out.setdefault(SHARDING, out.pop(legacy))
    if MESH in out and out[MESH] is None:
        del out[MESH]
    return out


def flax_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical metadata spelled the way the installed Flax expects it."""
    out = dict(metadata)
    if SHARDING in out:
        out[FLAX_SHARDING] = out.pop(SHARDING)
    return out


def dotted(path: Path) -> str:
    """`("h", 0, "attn")` -> `"h.0.attn"` (torch's spelling, and the one rules match on)."""
    return ".".join(map(str, path))


def index_of(part: Any) -> int | None:
    """The list position a key part spells, or None: an int, or a string of ASCII digits
    without a leading zero (`"0"`, `"12"`). `"007"`, `"٣"` and `"²"` are names, so two
    keys that differ in spelling never become one path."""
    if isinstance(part, int) and not isinstance(part, bool):
        return part
    if (
        isinstance(part, str)
        and part.isascii()
        and part.isdigit()
        and (part == "0" or part[0] != "0")
    ):
        return int(part)
    return None


def positions(path: tuple[Any, ...]) -> Path:
    """`path` with every part that spells a list position as an int."""
    return tuple(part if (index := index_of(part)) is None else index for part in path)


def parse_dotted(key: str) -> Path:
    """`"h.0.attn"` -> `("h", 0, "attn")`: parts that spell a position (`index_of`) are
    list indices; every other part, `"01"` included, stays the string it is."""
    return positions(tuple(key.split(".")))


def parse_dotted_keys(keys: Iterable[str]) -> list[Path]:
    """`parse_dotted` of each key, each distinct part parsed once: a model's keys repeat
    their parts (`layers`, `weight`, the block numbers), so that a file of 50,000 keys
    has a fraction as many distinct parts."""
    split = [key.split(".") for key in keys]
    distinct = tuple(dict.fromkeys(chain.from_iterable(split)))
    spelled = dict(zip(distinct, positions(distinct), strict=True)).__getitem__
    return [tuple(map(spelled, key)) for key in split]


def linen_path(path: Path) -> tuple[str, ...]:
    """`("layers", 0, "kernel")` -> `("layers_0", "kernel")`: Linen names list items."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int) and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(str(part))
    return tuple(out)


def match_key(path: Path) -> str:
    """The spelling-independent key two paths are matched by (`"layers_0/kernel"`)."""
    return "/".join(linen_path(path))


def position_key(path: tuple[Any, ...]) -> str:
    """The key that the spellings of one list position share: `("layers", 0)` (an
    `nnx.List` index), `"layers_0"` (Linen's automatic name) and `("layers", "0")` (a
    Linen module named '0', as transformers' Flax models name their layers) all give
    `"layers_0"`. Matching falls back to it only where it is unambiguous."""
    return match_key(positions(path))


class PathLookup:
    """Values by path: the exact match key first, else the one value whose position key
    is the path's, when exactly one value has that position key (two spellings of one
    position are never guessed between)."""

    def __init__(self, items: Mapping[Path, Any]) -> None:
        self.items = items
        self.exact = {match_key(path): value for path, value in items.items()}

    def get(self, path: Path, default: Any = None) -> Any:
        found = self.exact.get(match_key(path))
        if found is not None:
            return found
        candidates = self.by_position.get(position_key(path), [])
        return candidates[0] if len(candidates) == 1 else default

    @functools.cached_property
    def by_position(self) -> dict[str, list[Any]]:
        """The values by position key, made at the first lookup the exact keys miss."""
        by_position: dict[str, list[Any]] = {}
        for path, value in self.items.items():
            by_position.setdefault(position_key(path), []).append(value)
        return by_position

    def __bool__(self) -> bool:
        return bool(self.exact)


def flatten_mapping(tree: Mapping[Any, Any]) -> dict[tuple[Any, ...], Any]:
    """Nested dicts (FrozenDicts too) -> `{path: leaf}`; anything not a dict is a leaf."""
    return traverse_util.flatten_dict(tree)


def unflatten_mapping(flat: Mapping[tuple[Any, ...], Any]) -> dict[Any, Any]:
    return traverse_util.unflatten_dict(dict(flat))


def is_linen_collection(name: Any) -> bool:
    """A collection name Flax knows: its Variable type registry, which custom Variable
    types join, not a fixed list."""
    return isinstance(name, str) and name in variablelib.VariableTypeCache


TRAINING_FIELDS = frozenset({"step", "opt_state"})
"""The fields of a Linen `TrainState` (flax.training.train_state) besides its collections:
training state, which `convert` sets aside and `bridge.migrate` carries over."""


def is_training_state(tree: Mapping[Any, Any]) -> bool:
    """A Linen TrainState (or the dict of its fields): Linen collections next to `step`
    and / or `opt_state`, nothing else."""
    keys = set(tree)
    collections = {key for key in keys if is_linen_collection(key)}
    return (
        bool(collections) and bool(keys & TRAINING_FIELDS) and keys <= collections | TRAINING_FIELDS
    )


def by_collection(flat: Mapping[Path, Any], where: str) -> FlatState:
    """`{(collection, *path): value}` -> `{path: Leaf(value, kind=collection)}`; a path held
    in two collections is refused (NNX cannot hold both under one path). A TrainState's
    training fields keep their full path, without a kind."""
    out: FlatState = {}
    training = is_training_state(dict.fromkeys(path[0] for path in flat))
    for (collection, *rest), value in flat.items():
        if training and collection in TRAINING_FIELDS:
            out[(collection, *rest)] = Leaf(value)
            continue
        path = tuple(rest)
        if path in out:
            raise FormatError(
                f"{where}: {'/'.join(map(str, path))!r} is in both collections "
                f"{out[path].kind!r} and {collection!r}; NNX cannot hold both under one path"
            )
        out[path] = Leaf(value, kind=str(collection))
    return out


def as_numpy(key: str, value: Any) -> np.ndarray:
    """`np.asarray(value)` for a writer, turning "not an array" into a `FormatError` that
    names the key (a lazy source that is itself corrupt raises its own); jax arrays are
    copied as `host_array` says."""
    try:
        return host_array(on_this_process(value, repr(key)))
    except FormatError:
        raise
    except (TypeError, ValueError) as exc:
        raise FormatError(
            f"{key!r}: cannot make an array of {type(value).__name__}: {exc}"
        ) from exc


def check_nestable(paths: Iterable[Path], where: str, sep: str = ".") -> None:
    """Refuse, naming both keys (parts joined by `sep`), the flat paths one nested tree
    (NNX State, Linen variables, a msgpack map, an Orbax tree) cannot hold: the same path
    twice, a leaf that is also the parent of others (`a` and `a.b`, which flat formats
    such as safetensors hold), and a node holding both a list position and a name (`h.1`
    and `h.01`: NNX sorts the keys of every node, and ints and strings do not compare)."""

    def spelled(path: Path) -> str:
        return repr(sep.join(map(str, path)))

    paths = list(paths)
    leaves: set[Path] = set()
    for path in paths:
        if path in leaves:
            raise FormatError(
                f"{where}: two leaves are spelled {spelled(path)}; rename one with rules=..."
            )
        leaves.add(path)
    children: dict[Path, dict[bool, Path]] = {}
    for path in paths:
        for depth in range(len(path)):
            parent = path[:depth]
            if depth and parent in leaves:
                raise FormatError(
                    f"{where}: {spelled(parent)} is both a leaf and the parent of "
                    f"{spelled(path)}; a nested tree cannot hold both, rename one with rules=..."
                )
            seen = children.setdefault(parent, {})
            seen.setdefault(isinstance(path[depth], str), path)
            if len(seen) > 1:
                raise FormatError(
                    f"{where}: {spelled(seen[True])} and {spelled(seen[False])}: a nested tree "
                    "cannot hold a list position and a name under one node "
                    f"({sep.join(map(str, parent)) or 'the top'}); rename one with rules=..."
                )
