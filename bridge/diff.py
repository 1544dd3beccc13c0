"""What differs between two states of any formats: keys, shapes, dtypes and values.

Values are compared bit for bit (`exact`: a NaN's payload and the sign of zero count),
or as numbers within a tolerance (NaN equals NaN, -0.0 equals 0.0)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from bridge.api import convert
from bridge.graph import GRAPH, Context
from bridge.tree import Leaf, match_key

TORCH_SIDE = frozenset({"torch", "safetensors"})


def read(path: str, fmt: str, other: str, modules: dict[str, str] | None) -> dict[str, Leaf]:
    """The leaves of `path` (of format `fmt`) by spelling-free key; a Flax-side file
    meeting a torch-side format `other` is converted to a torch state_dict first (Flax
    roles make that direction unambiguous), so that layouts and names meet."""
    obj: Any = path
    if fmt not in TORCH_SIDE and other in TORCH_SIDE:
        obj, fmt = convert(obj, to="torch", **({"modules": modules} if modules else {})), "torch"
    flat = GRAPH.format(fmt).read(obj, Context(source=fmt))
    return {match_key(key): leaf for key, leaf in flat.items() if not leaf.transient}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How values are compared: bit for bit, or within `rtol`/`atol` as numbers."""

    exact: bool = False
    rtol: float = 0.0
    atol: float = 0.0

    def __str__(self) -> str:
        if self.exact:
            return "bit for bit"
        return f"rtol={self.rtol:g}, atol={self.atol:g} (NaN == NaN, -0.0 == 0.0)"

    def to_json(self) -> dict[str, Any]:
        if self.exact:
            return {"mode": "exact"}
        return {"mode": "tolerance", "rtol": self.rtol, "atol": self.atol}

    def differing(self, a: Any, b: Any) -> int:
        """How many elements of the same-shaped `a` and `b` differ."""
        x, y = np.ascontiguousarray(a), np.ascontiguousarray(b)
        if self.exact:
            if x.dtype != y.dtype:
                return x.size  # no bit pattern means the same in two dtypes
            bits_x = x.reshape(-1).view(np.uint8).reshape(x.size, x.dtype.itemsize)
            bits_y = y.reshape(-1).view(np.uint8).reshape(y.size, y.dtype.itemsize)
            return int(np.count_nonzero((bits_x != bits_y).any(axis=1)))
        if x.dtype == y.dtype and x.dtype.kind in "biu":
            return int(np.count_nonzero(x != y))
        close = np.isclose(_wide(x), _wide(y), rtol=self.rtol, atol=self.atol, equal_nan=True)
        return int(close.size - np.count_nonzero(close))


def _wide(x: np.ndarray) -> np.ndarray:
    return x.astype(np.complex128 if x.dtype.kind == "c" else np.float64)


def max_abs_diff(a: Any, b: Any) -> float | None:
    """The largest |a - b| over elements that are numbers on both sides; None if none."""
    gap = np.abs(_wide(np.asarray(a)) - _wide(np.asarray(b)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN difference
        largest = float(np.nanmax(gap)) if gap.size else 0.0
    return largest if math.isfinite(largest) else None


@dataclasses.dataclass(frozen=True)
class Diff:
    """Keys only in `a` or `b`; and, of the keys in both, those whose shape, dtype or
    values differ (values of different shapes are not compared)."""

    comparison: Comparison
    only_a: list[str]
    only_b: list[str]
    shapes: list[dict[str, Any]]
    dtypes: list[dict[str, Any]]
    values: list[dict[str, Any]]

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.shapes or self.dtypes or self.values)

    def summary(self) -> str:
        """The differences in one line: the count of each kind and the first key."""
        kinds = (
            ("only in a", self.only_a),
            ("only in b", self.only_b),
            ("shape", [d["key"] for d in self.shapes]),
            ("dtype", [d["key"] for d in self.dtypes]),
            ("values", [d["key"] for d in self.values]),
        )
        return "; ".join(f"{len(keys)} {kind} ({keys[0]})" for kind, keys in kinds if keys)


def compare(left: dict[str, Leaf], right: dict[str, Leaf], comparison: Comparison) -> Diff:
    """What differs between two states read by `read`."""
    shapes, dtypes, values = [], [], []
    for key in sorted(set(left) & set(right)):
        x, y = left[key], right[key]
        if x.shape != y.shape:
            shapes.append({"key": key, "a": list(x.shape), "b": list(y.shape)})
            continue
        if str(x.dtype) != str(y.dtype):
            dtypes.append({"key": key, "a": str(x.dtype), "b": str(y.dtype)})
        a, b = np.asarray(x.value), np.asarray(y.value)
        if count := comparison.differing(a, b):
            values.append({"key": key, "elements": count, "max_abs_diff": max_abs_diff(a, b)})
    return Diff(
        comparison,
        sorted(set(left) - set(right)),
        sorted(set(right) - set(left)),
        shapes,
        dtypes,
        values,
    )
