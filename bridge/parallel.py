"""Reading and placing tensors on several threads, in order and in bounded memory.

Reading a tensor from a file and copying it to a device releases the GIL (numpy copies,
jax transfers), so loads of many tensors gain from a few threads. Results come back in
the order of the input, so the output is the same, key order included, whatever the
number of threads; at most `threads + 1` tensors are in flight at once. JAX's default
device and 64-bit mode are set per thread (`jax.default_device`, `jax.enable_x64`): the
workers take the caller's, so that they place and narrow exactly as the caller would.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import jax

Item = TypeVar("Item")
Result = TypeVar("Result")


def thread_count(options: Mapping[str, Any]) -> int:
    """The `threads=` option: a positive int, or `"auto"` for one per core; 1 (the
    default) handles one tensor at a time on the calling thread."""
    value = options.get("threads", 1)
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"threads={value!r}: expected a positive int or 'auto'")
    return value


def in_order(
    fn: Callable[[Item], Result], items: Iterable[Item], threads: int
) -> Iterator[tuple[Item, Result]]:
    """`(item, fn(item))` for each item, in order, `fn` running on up to `threads` threads
    over a sliding window (never all items at once: each result holds a tensor). The
    first error, in input order, is raised as `fn` raised it."""
    if threads == 1:
        for item in items:
            yield item, fn(item)
        return
    device, x64 = jax.config.jax_default_device, jax.config.jax_enable_x64

    def as_caller(item: Item) -> Result:
        with jax.default_device(device), jax.enable_x64(x64):
            return fn(item)

    window: collections.deque[tuple[Item, Future[Result]]] = collections.deque()
    with ThreadPoolExecutor(threads) as pool:
        for item in items:
            window.append((item, pool.submit(as_caller, item)))
            if len(window) > threads:
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()
