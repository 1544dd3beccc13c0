"""Linen variables: `{collection: {module: {... : array}}}`, dict or FrozenDict, plain or
boxed (`nn.Partitioned`, `nn.LogicallyPartitioned`, Flax's `NNXMeta`).

The collection is the leaf's kind; Flax's registry ties it to an NNX Variable type. Paths
are spelled the Linen way (`layers_0`); matching against a template restores list
indices. Transient state (NNX RNG) has no place here: the edge into Linen drops it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from flax.core import meta
from flax.nnx import State, variablelib
from flax.nnx.bridge.variables import NNXMeta

from bridge.graph import (
    Context,
    drop_transient,
    register_conversion,
    register_format,
    set_aside_training,
)
from bridge.parallel import in_order, thread_count
from bridge.progress import track
from bridge.tree import (
    MESH,
    SHARDING,
    SHARDING_RULES,
    FlatState,
    Leaf,
    Path,
    by_collection,
    check_nestable,
    flatten_mapping,
    flax_metadata,
    is_linen_collection,
    is_training_state,
    linen_path,
    normalize_metadata,
    to_jax,
    unflatten_mapping,
)

_PARTITIONING = {SHARDING, MESH, SHARDING_RULES}


def _unbox(box: Any) -> tuple[Any, dict[str, Any]]:
    """A Linen leaf -> (array, canonical metadata)."""
    if isinstance(box, NNXMeta):
        return box.value, dict(box.metadata)
    if isinstance(box, nn.LogicallyPartitioned):
        return box.value, {SHARDING: box.names, MESH: box.mesh, SHARDING_RULES: box.rules}
    if isinstance(box, meta.Partitioned):
        return box.value, {SHARDING: box.names, MESH: box.mesh}
    if isinstance(box, meta.AxisMetadata):
        return box.unbox(), {}
    return box, {}


def _box(leaf: Leaf) -> Any:
    """A leaf -> the Linen box that keeps its metadata (a plain array when it has none)."""
    extra = set(leaf.metadata) - _PARTITIONING
    if extra:
        variable_type = variablelib.variable_type_from_name(
            leaf.kind or "params", allow_register=True
        )
        return NNXMeta(variable_type, leaf.value, flax_metadata(leaf.metadata))
    if SHARDING not in leaf.metadata:
        return leaf.value
    names, mesh = leaf.metadata[SHARDING], leaf.metadata.get(MESH)
    if SHARDING_RULES in leaf.metadata:
        return nn.LogicallyPartitioned(leaf.value, names, mesh, leaf.metadata[SHARDING_RULES])
    return nn.Partitioned(leaf.value, names, mesh)


def read_linen(variables: Mapping[str, Any], ctx: Context) -> FlatState:
    flat = flatten_mapping(variables)
    if is_training_state(variables):
        flat = set_aside_training(flat, "Linen TrainState", ctx)
    flat = by_collection(flat, "Linen variables")
    out: FlatState = {}
    for path, leaf in flat.items():
        value, metadata = _unbox(leaf.value)
        out[path] = leaf.replace(value=value, metadata=normalize_metadata(metadata))
    return out


def write_linen(flat: FlatState, ctx: Context) -> dict[str, Any]:
    boxed = ctx.options.get("boxed", False)
    subject = ctx.report.subject or "linen"
    keys = {path: (leaf.kind or "params", *linen_path(path)) for path, leaf in flat.items()}
    check_nestable(keys.values(), subject, sep="/")  # before any array is placed
    out: dict[tuple[str, ...], Any] = {}
    unboxed_metadata = 0
    on_host: list[str] = []

    def place(item: tuple[Path, Leaf]) -> Any:
        return to_jax(item[1].value, f"{subject}: {'/'.join(keys[item[0]])!r}")

    items = track(flat, ctx, "loading")
    for (path, leaf), value in in_order(place, items, thread_count(ctx.options)):
        key = keys[path]
        leaf = leaf.replace(value=value)
        if isinstance(leaf.value, np.ndarray):
            on_host.append("/".join(key))
        out[key] = _box(leaf) if boxed else leaf.value
        unboxed_metadata += bool(leaf.metadata) and not boxed
    ctx.report.note_kept_on_host(on_host)
    if unboxed_metadata:
        ctx.report.notes.append(
            f"{unboxed_metadata} leaves written as plain arrays without their metadata "
            "(partitioning, ...); pass boxed=True to keep it"
        )
    return unflatten_mapping(out)


def spell(path: Path, leaf: Leaf) -> str:
    return "/".join((leaf.kind or "params", *linen_path(path)))


def detect(obj: Any) -> float:
    """Collection-first dicts: sure when every top key is a registered collection name,
    likely when some are (`params` next to a custom `losses`); a dict of unknown names
    only could as well be a pure NNX state (pass `source="linen"`)."""
    if isinstance(obj, State) or not isinstance(obj, Mapping) or not obj:
        return 0.0
    if is_training_state(obj):
        return 0.9
    if not all(isinstance(key, str) and isinstance(value, Mapping) for key, value in obj.items()):
        return 0.0
    known = [key for key in obj if is_linen_collection(key)]
    return 0.9 if len(known) == len(obj) else 0.7 if known else 0.4


register_format(
    "linen",
    detect=detect,
    read=read_linen,
    write=write_linen,
    description="Linen variables {collection: {...}}, dict or FrozenDict, boxed or not",
    spell=spell,
    options={"boxed"},
)
register_conversion("linen", "nnx_state")
register_conversion(
    "nnx_state", "linen", lossy=True, loses="NNX RNG state", transform=drop_transient
)
