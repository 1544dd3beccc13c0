"""NNX: a Module (`nnx`) and its State (`nnx_state`, or the pure dict of `to_pure_dict`).

Variable types become leaf kinds through Flax's own registry (`params` <-> `nnx.Param`,
custom subclasses registered under their class name), so a kind means the same thing
to every format. RNG state is marked transient: other formats may not hold it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import variablelib

from bridge.errors import FormatError
from bridge.graph import Context, register_conversion, register_format
from bridge.layout import FLAX_FAMILIES, family
from bridge.parallel import in_order, thread_count
from bridge.progress import track
from bridge.tree import (
    FlatState,
    Leaf,
    Path,
    check_nestable,
    dotted,
    flatten_mapping,
    flax_metadata,
    normalize_metadata,
    to_jax,
)

_FLAGS = variablelib.Variable.required_metadata
"""Metadata that says how a Variable behaves in this process (ref, hijax, eager
sharding), not what it holds: not carried between formats."""


_GET_VALUE = nnx.Variable.get_value


def kind_of(variable_type: type[nnx.Variable]) -> str:
    return variablelib.variable_name_from_type(variable_type, allow_register=True)


def type_of(kind: str | None) -> type[nnx.Variable]:
    return variablelib.variable_type_from_name(kind or "params", allow_register=True)


def _leaf(variable: Any, module: str | None = None) -> Leaf:
    if not isinstance(variable, nnx.Variable):
        return Leaf(variable, module=module)
    metadata = variable.get_metadata()
    value = _value(variable, metadata)
    metadata = {k: v for k, v in metadata.items() if k not in _FLAGS}
    return Leaf(
        value,
        kind=kind_of(type(variable)),
        metadata=normalize_metadata(metadata),
        transient=isinstance(variable, nnx.RngState),
        module=module,
    )


def _value(variable: nnx.Variable, metadata: Mapping[str, Any]) -> Any:
    """`variable.get_value()`, skipped where it would change nothing: Flax's copies the
    held pytree, reads array refs and runs `on_get_value` hooks, and a concrete array or
    a placeholder held without hooks is its own value (a tracer may be a ref); a
    Variable type of its own may say otherwise."""
    raw = variable.get_raw_value()
    plain = isinstance(raw, np.ndarray | jax.ShapeDtypeStruct) or (
        isinstance(raw, jax.Array) and not isinstance(raw, jax.core.Tracer)
    )
    if plain and "on_get_value" not in metadata and type(variable).get_value is _GET_VALUE:
        return raw
    return variable.get_value()


def read_state(state: Any, ctx: Context) -> FlatState:
    if isinstance(state, nnx.State):
        return {tuple(path): _leaf(variable) for path, variable in nnx.to_flat_state(state)}
    return {tuple(path): Leaf(value) for path, value in flatten_mapping(state).items()}


def _child(node: Any, key: Any) -> Any:
    """What a graph node holds under `key`: an item of a list or a mapping, else an
    attribute (a Module's, an `nnx.List`'s or a pytree's)."""
    return node[key] if isinstance(key, int) or isinstance(node, Mapping) else getattr(node, key)


def _families(model: nnx.Pytree, leaves: dict[Path, Any]) -> dict[Path, str | None]:
    """The family (Linear, Conv, ...) of each module owning a leaf, found by following the
    leaves' paths from the model, each node once: a second walk of the whole graph
    (`nnx.iter_graph`) costs as much as the split. Where a path does not lead to its
    leaf by item and attribute access (a custom pytree node), the graph is walked."""
    nodes: dict[Path, Any] = {(): model}

    def node_at(path: Path) -> Any:  # a loop, not a recursion: a closure calling itself
        known = len(path)  # is a cycle, which would keep `nodes` until a collection
        while path[:known] not in nodes:
            known -= 1
        node = nodes[path[:known]]
        for depth in range(known + 1, len(path) + 1):
            node = nodes[path[:depth]] = _child(node, path[depth - 1])
        return node

    try:
        if all(node_at(path) is leaf for path, leaf in leaves.items()):
            found = nodes.items()
        else:
            found = nnx.iter_graph(model)
    except (LookupError, AttributeError, TypeError):
        found = nnx.iter_graph(model)
    return {
        tuple(path): family(type(node), FLAX_FAMILIES)
        for path, node in found
        if isinstance(node, nnx.Module)
    }


def read_module(model: nnx.Pytree, ctx: Context) -> FlatState:
    """The state, each leaf knowing its module's family (Linear, Conv, ...) for layout."""
    graphdef, state = nnx.split(model)
    leaves = _template_variables(state)
    ctx.walks[id(model)] = graphdef, leaves
    families = _families(model, leaves)
    return {path: _leaf(leaf, families.get(path[:-1])) for path, leaf in leaves.items()}


def _template_variables(template: Any) -> dict[Path, nnx.Variable]:
    if isinstance(template, nnx.Pytree):
        template = nnx.state(template)
    if not isinstance(template, nnx.State):
        return {}
    return {tuple(path): variable for path, variable in nnx.to_flat_state(template)}


def _sharding(path: Path, like: nnx.Variable | None, ctx: Context) -> Any:
    """Where a leaf goes: `shardings={dotted key: Sharding}` if given, else the sharding
    the template's value carries (abstract `ShapeDtypeStruct`s from `nnx.eval_shape`
    under a mesh, or `nnx.get_abstract_model`, carry one)."""
    explicit = ctx.options.get("shardings")
    if explicit and dotted(path) in explicit:
        return explicit[dotted(path)]
    value = _value(like, like.get_metadata()) if like is not None else None
    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
        sharding.mesh, jax.sharding.AbstractMesh
    ):  # nnx.eval_shape under `jax.set_mesh`: the devices are those of the current mesh
        mesh = jax.sharding.get_mesh()
        if mesh.empty:
            raise FormatError(
                f"{dotted(path)}: the template is sharded over an abstract mesh; convert "
                "under `with jax.set_mesh(mesh):`, or build it with nnx.get_abstract_model"
            )
        sharding = jax.sharding.NamedSharding(mesh, sharding.spec)
    return sharding


def _fresh_rng(leaf: Leaf, index: int, seed: int) -> Any:
    """Concrete RNG state for a placeholder: an abstract template holds no keys."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.split(key, leaf.shape) if leaf.shape else key
    return jnp.zeros(leaf.shape, leaf.dtype)


def write_state(flat: FlatState, ctx: Context) -> nnx.State:
    return _filled(flat, ctx, _template_variables(ctx.template))


def _filled(flat: FlatState, ctx: Context, like: dict[Path, nnx.Variable]) -> nnx.State:
    """The state of `flat`, each leaf in its template Variable (`like`) where it has one;
    leaves are read and placed on `threads=` threads."""
    subject = ctx.report.subject or "nnx_state"
    check_nestable(flat, subject)
    seed = ctx.options.get("rng_seed", 0)
    variables = []
    on_host = []
    placing = (  # where each leaf goes is decided here: the mesh in use is this thread's
        (path, leaf, f"{subject}: {dotted(path)!r}", _sharding(path, like.get(path), ctx))
        for path, leaf in track(flat, ctx, "loading")
    )
    placed = in_order(
        lambda item: to_jax(item[1].value, *item[2:]), placing, thread_count(ctx.options)
    )
    for index, ((path, leaf, _, _), value) in enumerate(placed):
        if isinstance(value, np.ndarray):
            on_host.append(dotted(path))
        if leaf.transient and leaf.is_abstract:
            value = _fresh_rng(leaf, index, seed)
            ctx.report.notes.append(f"{dotted(path)}: RNG state created with rng_seed={seed}")
        metadata = flax_metadata(leaf.metadata)
        if path in like:
            variable = like[path].replace(value=value, **metadata)
        else:
            with nnx.use_eager_sharding(False):
                variable = type_of(leaf.kind)(value, **metadata)
        variables.append((path, variable))
    ctx.report.note_kept_on_host(on_host)
    return nnx.from_flat_state(variables)


def write_module(flat: FlatState, ctx: Context) -> nnx.Pytree:
    walked = ctx.walks.get(id(ctx.template))
    if walked is None:
        graphdef, state = nnx.split(ctx.template)
        walked = graphdef, _template_variables(state)
    graphdef, variables = walked
    return nnx.merge(graphdef, _filled(flat, ctx, variables))


def _is_pure_state(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    leaves = flatten_mapping(obj).values()
    return all(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves)


register_format(
    "nnx",
    detect=lambda obj: 1.0 if isinstance(obj, nnx.Pytree) else 0.0,
    read=read_module,
    write=write_module,
    description="an nnx.Module (or other NNX object, e.g. nnx.Optimizer), concrete or "
    "abstract (nnx.eval_shape)",
    options={"rng_seed", "shardings"},
)
register_format(
    "nnx_state",
    detect=lambda obj: 1.0 if isinstance(obj, nnx.State) else 0.5 * _is_pure_state(obj),
    read=read_state,
    write=write_state,
    description="an nnx.State, or the nested dict of nnx.to_pure_dict",
    options={"rng_seed", "shardings"},
)
register_conversion("nnx", "nnx_state")
register_conversion("nnx_state", "nnx", needs={"template"})
