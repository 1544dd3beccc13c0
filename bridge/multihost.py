"""Saves under `jax.distributed`: every process calls the same `bridge.save`, and they
meet through the runtime's collectives, nothing of bridge's own.

With one process every function here is the plain single-process path. With several:

- `together` ends a step on every process at once: if it failed on any, it fails on all
  (the failing process raises its own error, the others `PeerError`), so no process is
  left waiting in a later collective for one that gave up;
- `shared_output` is `atomic_output` for a directory all processes write into (an Orbax
  checkpoint): process 0 makes the temporary and tells the others its name, and moves
  it into place once every process has finished its part (or, if any failed, once
  the temporary is gone);
- `failing_together` gives a library's own multi-process step (Orbax's save) a barrier
  and a wait that end on every process as soon as one reports a failure, not at the
  library's timeout;
- `gathering` / `gathered` give a save's source arrays that span processes a number,
  the same on every process, and `written_by_primary` runs a single-file writer
  (safetensors, msgpack) on process 0 while the others serve it: each such array is
  gathered when process 0's writer reads it, one array at a time, and every process
  returns once the file is in place.

Messages between processes are short texts exchanged with
`multihost_utils.process_allgather`, one collective per step, and, in
`failing_together`'s barriers, entries in the runtime's key-value store.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from bridge.atomic import atomic_output
from bridge.errors import PeerError
from bridge.tree import LazyArray

T = TypeVar("T")

MESSAGE_BYTES = 2048
"""The longest message a process sends (an error, a temporary's name); longer ones are cut."""


def processes() -> int:
    """How many processes the program runs as (1 without `jax.distributed`)."""
    return jax.process_count()


def is_primary() -> bool:
    """Whether this is process 0, which writes what only one process writes."""
    return jax.process_index() == 0


def _exchange(text: str) -> list[str]:
    """Every process's `text`, by process index; every process must call it."""
    data = text.encode()[:MESSAGE_BYTES]
    buffer = np.zeros(MESSAGE_BYTES + 2, np.uint8)
    buffer[:2] = np.frombuffer(len(data).to_bytes(2, "little"), np.uint8)
    buffer[2 : 2 + len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buffer))
    return [
        bytes(row[2 : 2 + int.from_bytes(bytes(row[:2]), "little")]).decode(errors="replace")
        for row in rows
    ]


def agree(step: str, error: Exception | None = None, payload: str = "") -> str:
    """Every process reports how `step` went; returns process 0's `payload`. If another
    process failed and this one did not, raises `PeerError` naming them and their errors;
    a process that failed gets back to raising its own `error`."""
    mine = f"failed {type(error).__name__}: {error}" if error is not None else f"ok {payload}"
    reports = _exchange(mine)
    failed = {index: report[7:] for index, report in enumerate(reports) if report[:7] == "failed "}
    if failed and error is None:
        listed = "; ".join(f"process {index}: {message}" for index, message in failed.items())
        raise PeerError(f"{step} failed on {len(failed)} of {len(reports)} processes: {listed}")
    return reports[0].removeprefix("ok ")


@contextlib.contextmanager
def together(step: str, *, collective: bool = True) -> Iterator[None]:
    """Run the block, then `agree` on it: it raises on every process if it raised on any.
    Without `collective` (or with one process) just the block."""
    if not collective or processes() == 1:
        yield
        return
    try:
        yield
    except Exception as exc:
        agree(step, exc)
        raise
    agree(step)


@contextlib.contextmanager
def shared_output(
    path: str | os.PathLike[str], *, overwrite: bool = False, directory: bool = False
) -> Iterator[Path]:
    """`atomic_output` for an output every process writes a part of: process 0 makes the
    temporary (checks, sweeps, locks as `atomic_output` does) and the others build in the
    same place; once all are done, process 0 moves it into place. Every step is agreed,
    so all processes return with the output in place, or all raise and none is left."""
    if processes() == 1:
        with atomic_output(path, overwrite=overwrite, directory=directory) as built:
            yield built
        return
    output = atomic_output(path, overwrite=overwrite, directory=directory) if is_primary() else None
    built = ""
    try:
        if output is not None:
            built = os.fspath(output.__enter__())
    except Exception as exc:
        agree(f"{path}: making the temporary", exc)
        raise
    built = agree(f"{path}: making the temporary", payload=built)

    error: Exception | None = None
    try:
        yield Path(built)
    except Exception as exc:
        error = exc
    try:
        agree(f"{path}: writing", error)
        if error is not None:
            raise error
    except BaseException as exc:
        try:
            if output is not None:
                output.__exit__(type(exc), exc, exc.__traceback__)
        finally:
            if isinstance(exc, Exception):  # the others return once nothing is left
                agree(f"{path}: removing the temporary")
        raise

    error = None
    if output is not None:
        try:
            output.__exit__(None, None, None)
        except Exception as exc:
            error = exc
    agree(f"{path}: moving into place", error)
    if error is not None:
        raise error


CANCEL_SECONDS = 10
"""How long `Peers.wait` gives a library's cancelled work to end before leaving it."""
POLL_SECONDS = 0.05
"""How often a process waiting in `failing_together`'s barrier looks for a failure."""


class Peers:
    """The other processes of a library's own multi-process step (Orbax's save), as
    `failing_together` gives them to it. `barrier` is one for the library to meet in
    (Orbax's `AsyncOptions(barrier_sync_fn=...)`; None with one process: the library's
    own); `wait(finish)` runs the library's wait for its background work. Both end with
    `PeerError` as soon as another process reports a failure of the step, instead of
    waiting for what that process will never do.

    Reports and arrivals go through the runtime's key-value store, not a collective: a
    process may wait in a thread of the library's while another has left the step."""

    def __init__(self, name: str) -> None:
        self.name = name
        # the runtime's client, as Orbax itself reaches it (jax has no public name for it)
        self.client = jax._src.distributed.global_state.client if processes() > 1 else None
        self.barrier = self._barrier if self.client is not None else None

    def raise_if_failed(self) -> None:
        if failed := self.client.key_value_dir_get(f"bridge/{self.name}/failed/"):
            listed = "; ".join(
                f"process {key.rpartition('/')[2]}: {message}" for key, message in failed
            )
            raise PeerError(
                f"{self.name} failed on {len(failed)} of {processes()} processes: {listed}"
            )

    def report(self, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
        key = f"bridge/{self.name}/failed/{jax.process_index()}"
        self.client.key_value_set(key, message.decode(errors="ignore"))

    def _barrier(self, *, key: str, timeout_ms: int) -> None:
        arrived = f"bridge/{self.name}/barrier/{key}/"
        self.client.key_value_set(f"{arrived}{jax.process_index()}", "")
        deadline = time.monotonic() + timeout_ms / 1000
        while len(self.client.key_value_dir_get(arrived)) < processes():
            self.raise_if_failed()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: barrier {key!r} not met in {timeout_ms} ms")
            time.sleep(POLL_SECONDS)

    def wait(self, finish: Callable[[], None], cancel: Callable[[], None]) -> None:
        """`finish()`; with several processes, in a thread of its own: if another process
        fails meanwhile, `cancel()` (the library's own) and a moment for `finish` to end,
        then `PeerError`."""
        if self.client is None:
            finish()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(finish())
            except BaseException as exc:
                done.set_exception(exc)

        threading.Thread(target=run, name=f"bridge: {self.name}", daemon=True).start()
        while True:
            try:
                return done.result(timeout=POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                try:
                    self.raise_if_failed()
                except PeerError:
                    cancel()
                    concurrent.futures.wait([done], timeout=CANCEL_SECONDS)
                    raise


@contextlib.contextmanager
def failing_together(name: str) -> Iterator[Peers]:
    """The `Peers` of a library's own multi-process step (Orbax's save): an error in the
    block is reported to them (under `name`, the same on every process and unique to
    the step) and raised, so that they stop waiting for this process."""
    peers = Peers(name)
    try:
        yield peers
    except PeerError:  # another process's failure, reported already
        raise
    except Exception as exc:
        if peers.client is not None:
            peers.report(exc)
        raise


def spans_processes(value: Any) -> bool:
    """Whether `value` is a jax array with shards on other processes."""
    return isinstance(value, jax.Array) and not value.is_fully_addressable


class Gathered(LazyArray):
    """An array spanning processes, as a save's source leaf: read whole (on process 0,
    by a writer of one file) by a gather every process takes part in, which process 0
    announces by the array's number."""

    def __init__(self, number: int, array: jax.Array) -> None:
        self.number = number
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def read(self, index: Any = ...) -> np.ndarray:
        _exchange(f"gather {self.number}")
        return _held(_gather(self.array, keep=True))[index]


gathered_bytes = 0
"""Bytes of gathered arrays alive on this process (read by a writer, not yet freed)."""
peak_gathered_bytes = 0
"""The most `gathered_bytes` has been (since a test or benchmark set it to 0): how they
see that a writer on process 0 holds one gathered array at a time, not the model."""


def _held(array: np.ndarray) -> np.ndarray:
    """`array`, counted in `gathered_bytes` until it (and every view of it) is freed."""
    global gathered_bytes, peak_gathered_bytes
    gathered_bytes += array.nbytes
    peak_gathered_bytes = max(peak_gathered_bytes, gathered_bytes)
    weakref.finalize(array, _freed, array.nbytes)
    return array


def _freed(nbytes: int) -> None:
    global gathered_bytes
    gathered_bytes -= nbytes


def _gather(array: jax.Array, keep: bool) -> np.ndarray:
    """The whole of `array` on this host if `keep` (the reader's process), else an empty
    array: every process takes part in the gather, the reader alone keeps the data.

    jax's `process_allgather` copies the whole array onto every device; where the mesh
    has axes within each process, the copy is spread over them instead (each process
    holds the array once, across its devices) and the reader joins its slices."""
    spread = _spread_within_processes(array)
    if spread is None:
        whole = np.asarray(multihost_utils.process_allgather(array, tiled=True))
        return whole if keep else np.empty(0, array.dtype)
    copy = jax.jit(_identity, out_shardings=spread)(array)
    if not keep:
        copy.block_until_ready()
        return np.empty(0, array.dtype)
    whole = np.empty(array.shape, array.dtype)
    joined = set()
    for shard in copy.addressable_shards:  # devices along other axes hold the same slice
        where = tuple((part.start, part.stop) for part in shard.index)
        if where not in joined:
            joined.add(where)
            whole[shard.index] = np.asarray(shard.data)
    return whole


def _identity(array: jax.Array) -> jax.Array:
    return array


def _spread_within_processes(array: jax.Array) -> jax.sharding.NamedSharding | None:
    """A sharding on `array`'s mesh under which every process holds the whole array
    once: its first dimension that the mesh's axes within a process divide is split
    over those axes, and it is replicated along the others. None where the mesh has no
    axis within a process, or no dimension divides."""
    sharding = array.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    owners = np.vectorize(lambda device: device.process_index)(mesh.devices)
    local = [
        name
        for axis, name in enumerate(mesh.axis_names)
        if (owners == owners.take([0], axis=axis)).all() and mesh.shape[name] > 1
    ]
    count = math.prod(mesh.shape[name] for name in local)
    for dim, size in enumerate(array.shape):
        if local and size % count == 0:
            return jax.sharding.NamedSharding(mesh, jax.P(*[None] * dim, tuple(local)))
    return None


_GATHERING: contextvars.ContextVar[list[jax.Array] | None] = contextvars.ContextVar(
    "gathering", default=None
)
"""The arrays spanning processes of the save under way, numbered in source order, which
is the same on every process."""


@contextlib.contextmanager
def gathering(collective: bool = True) -> Iterator[None]:
    """Within the block (a save every process makes), `gathered` numbers the arrays that
    span processes, so that process 0 can name the one to gather next."""
    if not collective or processes() == 1:
        yield
        return
    token = _GATHERING.set([])
    try:
        yield
    finally:
        _GATHERING.reset(token)


def gathered(value: Any) -> Any:
    """A source leaf's value for a save: within `gathering`, an array spanning processes
    as a `Gathered` (layout rules wrap it as they wrap a file's tensor); else `value`."""
    arrays = _GATHERING.get()
    if arrays is None or not spans_processes(value):
        return value
    arrays.append(value)
    return Gathered(len(arrays) - 1, value)


def as_array(value: Any) -> Any:
    """What a writer that saves shards where they are (Orbax) takes: the jax array of a
    `Gathered` leaf, any other value unchanged."""
    return value.array if isinstance(value, Gathered) else value


def written_by_primary(write: Callable[[], T], result: T) -> T:
    """`write()` on process 0; its reads of `Gathered` leaves (one at a time: process 0
    holds one such array, not the model) are gathers the other processes serve. They
    return `result` once process 0's writer has returned (its output in place), or
    raise `PeerError` if it raised. With one process just `write()`."""
    arrays = _GATHERING.get()
    if arrays is None:
        return write()
    if is_primary():
        try:
            written = write()
        except Exception as exc:
            _exchange(f"failed {type(exc).__name__}: {exc}")
            raise
        _exchange("done")
        return written
    while True:
        command = _exchange("")[0]
        if command.startswith("gather "):
            _gather(arrays[int(command.removeprefix("gather "))], keep=False)
        elif command == "done":
            return result
        else:
            raise PeerError(f"process 0 failed to write the output: {command[7:]}")
