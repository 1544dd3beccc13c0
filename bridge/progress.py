"""Progress of long loads and saves: one bar over the bytes, advanced per tensor.

On by default when stderr is a terminal, off otherwise (CI logs, notebooks' captured
output) and with `progress=False`. tqdm draws it: small, well kept, and it computes
the bytes/s rate the bar shows.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from tqdm.auto import tqdm

from bridge.graph import Context
from bridge.tree import FlatState, Leaf, Path, dotted


def track(flat: FlatState, ctx: Context, verb: str) -> Iterator[tuple[Path, Leaf]]:
    """`flat.items()`, advancing a bar by each leaf's bytes once it has been handled."""
    enabled = ctx.options.get("progress")
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from flat.items()
        return
    total = sum(leaf.nbytes for leaf in flat.values())
    with tqdm(
        total=total,
        desc=verb,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
    ) as bar:
        for path, leaf in flat.items():
            bar.set_postfix_str(dotted(path), refresh=False)
            yield path, leaf
            bar.update(leaf.nbytes)
