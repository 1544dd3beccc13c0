"""Python's cyclic garbage collector, paused while a call builds its many small objects.

A conversion makes a few containers per leaf (paths, leaves, Flax's Variables and graph
nodes). CPython scans every object it tracks each time the long-lived ones grow by a
quarter (its full collections), so a call building a model of 50,000 leaves spent a
third of its time in those scans (`benchmarks/RESULTS.md`). Paused, what the call frees
is still freed at once (reference counting); only objects in reference cycles wait for
the collector's next run after the call. Bridge's own objects are in none (a test holds
it to that); the cycles a conversion leaves are Flax's (`nnx.to_flat_state`'s closure
and its list of path and Variable pairs, Variables the model holds anyway).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The collector off for the block, back on after it (left off if it was off). The
    pause is process-wide, as the collector is."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
