"""File-to-file conversions in bounded memory: leaves are handled in batches of at most
`batch_bytes` (plus one leaf larger than that), so a conversion holds about a batch,
never the model.

A writer walks its leaves through `items` (one leaf at a time) or `batches` (a list at a
time, for writers such as Orbax's that take many arrays per call). Sources
that read many arrays faster in one call than one by one (Orbax restores) hand out
`Fetched` lazy arrays: before a batch is handed on, the arrays under its leaves are
fetched together, and released once the writer moves on.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from bridge.errors import FormatError
from bridge.graph import Context
from bridge.progress import track
from bridge.tree import FlatState, LazyArray, Leaf, Path

K = TypeVar("K")
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
BATCH_BYTES = 64 * 2**20
"""Default bytes per batch: Orbax calls of this size cost little more than one call for all
(measured, benchmarks/RESULTS.md), and a batch is small next to a model."""


class Fetcher:
    """Reads many `Fetched` arrays of one source in one call."""

    def fetch(self, arrays: list[Fetched]) -> list[np.ndarray]:
        raise NotImplementedError


class Fetched(LazyArray):
    """A lazy array whose source reads many arrays at once cheaper than one by one: its
    data, once fetched with its batch, is kept until released; read alone otherwise."""

    fetcher: Fetcher
    _data: np.ndarray | None = None

    def read(self, index: Any = ...) -> np.ndarray:
        data = self._data if self._data is not None else self.fetcher.fetch([self])[0]
        return np.array(data[index])

    def view(self, index: Any = ...) -> np.ndarray:
        data = self._data if self._data is not None else self.fetcher.fetch([self])[0]
        return np.asarray(data)[index]


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand the heap memory freed since the last call back to the system (glibc's
    `malloc_trim`; nothing elsewhere). Orbax's reads and writes allocate each array's
    buffers on tensorstore's threads, and glibc keeps what they free for reuse: without
    this, a batch's freed buffers stay in the process after it (measured in
    benchmarks/RESULTS.md)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def parse_size(size: int | str, option: str) -> int:
    """A size option in bytes: an int, or `"5GB"`, `"500MB"`, `"10KB"` (decimal units,
    as `huggingface_hub` parses them); a finite positive number of bytes."""
    count: float = 0
    if isinstance(size, int) and not isinstance(size, bool):
        count = size
    elif isinstance(size, str) and size.strip()[-2:].upper() in SIZE_UNITS:
        text = size.strip()
        with contextlib.suppress(ValueError):
            count = float(text[:-2]) * SIZE_UNITS[text[-2:].upper()]
    if not 1 <= count < math.inf:  # NaN, 'infGB' and '1e400GB' too
        raise FormatError(
            f"{option}={size!r}: expected a positive number of bytes, or a string such "
            f"as '5GB' with unit {', '.join(SIZE_UNITS)}"
        )
    return int(count)


def batch_bytes(ctx: Context, default: int = BATCH_BYTES) -> int:
    """The `batch_bytes=` option in bytes, or `default`."""
    return parse_size(ctx.options.get("batch_bytes", default), "batch_bytes")


def is_file_to_file(obj: Any, options: dict[str, Any]) -> bool:
    """Whether a conversion reads a file or directory and writes one: the case in which
    readers stay lazy and writers go batch by batch."""
    return isinstance(obj, str | os.PathLike) and options.get("path") is not None


def _read_from(value: Any) -> Iterator[LazyArray]:
    """The lazy arrays a (possibly derived: transposed, cast, split) value reads."""
    if not isinstance(value, LazyArray):
        return
    inner = getattr(value, "sources", None)
    if inner is None and hasattr(value, "source"):
        inner = (value.source,)
    if inner is None:
        yield value
    for source in inner or ():
        yield from _read_from(source)


def _weight(leaf: Leaf) -> int:
    """The bytes handling `leaf` holds: its own, or those it reads if more (a cast to a
    narrower dtype reads the wider source)."""
    read = sum(math.prod(array.shape) * array.dtype.itemsize for array in _read_from(leaf.value))
    return max(leaf.nbytes, read)


def split(pairs: Iterable[tuple[K, Leaf]], size: int) -> list[list[tuple[K, Leaf]]]:
    """`(key, leaf)` pairs in order, cut into runs of at most `size` bytes read (a larger
    leaf alone)."""
    runs: list[list[tuple[K, Leaf]]] = [[]]
    total = 0
    for key, leaf in pairs:
        weight = _weight(leaf)
        if runs[-1] and total + weight > size:
            runs.append([])
            total = 0
        runs[-1].append((key, leaf))
        total += weight
    return [run for run in runs if run]


def _fetch(batch: Iterable[tuple[Path, Leaf]]) -> list[Fetched]:
    """Fetch every `Fetched` array under `batch`, one call per fetcher."""
    by_fetcher: dict[int, tuple[Fetcher, list[Fetched]]] = {}
    for _, leaf in batch:
        for array in _read_from(leaf.value):
            if isinstance(array, Fetched) and array._data is None:
                by_fetcher.setdefault(id(array.fetcher), (array.fetcher, []))[1].append(array)
    held = []
    for fetcher, arrays in by_fetcher.values():
        unique = list({id(array): array for array in arrays}.values())
        for array, data in zip(unique, fetcher.fetch(unique), strict=True):
            array._data = data
        held.extend(unique)
    return held


def batches(flat: FlatState, ctx: Context, verb: str) -> Iterator[list[tuple[Path, Leaf]]]:
    """`flat`'s items in batches of bounded bytes, their fetched sources held while the
    caller handles the batch, then let go and the freed heap handed back (Orbax ->
    safetensors of 5 GB: 542-595 MiB peak growth without, 390 MiB with); one progress
    bar for the whole job."""
    leaves = track(flat, ctx, verb)
    for run in split(flat.items(), batch_bytes(ctx)):
        held = _fetch(run)
        try:
            yield [next(leaves) for _ in run]
        finally:
            for array in held:
                array._data = None
            release_freed_memory()
    for _ in leaves:  # closes the bar
        pass


def items(flat: FlatState, ctx: Context, verb: str) -> Iterator[tuple[Path, Leaf]]:
    """`flat`'s items one by one, read batch by batch (see `batches`)."""
    for batch in batches(flat, ctx, verb):
        yield from batch
