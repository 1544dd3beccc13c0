"""Property tests: random NNX module trees survive NNX <-> Linen round trips bit-exactly.

Hypothesis draws a module tree (submodules, `nnx.List`s, Param / BatchStat / custom
Variable leaves of float32 / bfloat16 / int32 with random bit patterns, optional partition
names, logical rules and other metadata, optional RNG state). From one tree the test builds
the NNX module and, independently of bridge, the Linen variables dict it should correspond
to. Metadata is compared with the partitioning key spelled the same on every Flax release
(`out_sharding` from 0.12.4, `sharding_names` before) and without `mesh: None`.
"""

from __future__ import annotations

import dataclasses
import itertools
import keyword
import re
from collections.abc import Iterator, Mapping
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import freeze, meta
from flax.nnx.bridge.variables import NNXMeta
from hypothesis import given, settings
from hypothesis import strategies as st

import bridge

pytestmark = pytest.mark.flax_compat

SETTINGS = settings(max_examples=40, deadline=None)


class PropertyCustom(nnx.Variable):
    """A custom Variable type: Flax's registry files it under its class name. The name is
    unusual on purpose: the registry is process-wide and keyed by class name."""


COLLECTION = {nnx.Param: "params", nnx.BatchStat: "batch_stats", PropertyCustom: "PropertyCustom"}
DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.int32))
AXES = ("batch", "embed", "mlp", "heads")
FLAGS = frozenset({"hijax", "ref", "eager_sharding", "is_hijax", "has_ref", "is_mutable"})
"""Flax's per-process Variable flags (names of flax>=0.12.4 and of 0.12.1-0.12.3)."""
SHARDING_KEY = next(k for k in nnx.with_partitioning(jnp.asarray, ())(0).metadata if k != "mesh")
"""The installed Flax's spelling of the partitioning key."""


class Node(nnx.Module):
    """A module whose attributes are set from a spec."""


# ---------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    variable_type: type[nnx.Variable]
    dtype: np.dtype
    shape: tuple[int, ...]
    names: tuple[str | None, ...] | None = None  # partition names (Param only)
    rules: tuple[tuple[str, str | None], ...] | None = None  # logical rules (with names)
    note: int | None = None  # metadata Linen's partitioning boxes cannot hold


Tree = dict[str, Union[LeafSpec, "Tree", list["Tree"]]]


@dataclasses.dataclass(frozen=True)
class Case:
    tree: Tree
    seed: int
    rngs: bool  # the root also holds an `nnx.Rngs` under `rngs`

    def leaves(self) -> Iterator[tuple[tuple[str | int, ...], tuple[str, ...], LeafSpec]]:
        """`(NNX path, Linen path, leaf)` of every leaf, Linen names spelled by hand."""

        def walk(tree: Tree, path: tuple, linen: tuple) -> Iterator:
            for name, child in tree.items():
                if isinstance(child, LeafSpec):
                    yield (*path, name), (*linen, name), child
                elif isinstance(child, list):
                    for i, item in enumerate(child):
                        yield from walk(item, (*path, name, i), (*linen, f"{name}_{i}"))
                else:
                    yield from walk(child, (*path, name), (*linen, name))

        return walk(self.tree, (), ())

    def values(self) -> dict[tuple[str | int, ...], np.ndarray]:
        """Random bit patterns (NaNs, infinities, subnormals included) for every leaf."""
        rng = np.random.default_rng(self.seed)
        out = {}
        for path, _, leaf in self.leaves():
            bits = np.dtype(f"uint{8 * leaf.dtype.itemsize}")
            raw = rng.integers(0, np.iinfo(bits).max, size=leaf.shape, dtype=bits, endpoint=True)
            out[path] = np.asarray(raw).view(leaf.dtype)
        return out


def _valid_name(name: str) -> bool:
    # A name ending in `_<digits>` could collide with a list item's Linen spelling.
    return not (
        keyword.iskeyword(name)
        or re.search(r"_\d+$", name)
        or name == "rngs"
        or hasattr(Node, name)
    )


NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(_valid_name)


@st.composite
def leaf_specs(draw: st.DrawFn) -> LeafSpec:
    variable_type = draw(st.sampled_from(list(COLLECTION)))
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
    names = rules = None
    if variable_type is nnx.Param and draw(st.booleans()):
        axis = st.one_of(st.none(), st.sampled_from(AXES))
        names = tuple(draw(st.lists(axis, min_size=len(shape), max_size=len(shape))))
        if draw(st.integers(0, 3)) == 0:
            rule = st.tuples(st.sampled_from(AXES), st.one_of(st.none(), st.sampled_from("xy")))
            rules = tuple(draw(st.lists(rule, min_size=1, max_size=2)))
    note = draw(st.one_of(st.none(), st.integers(0, 9)))
    return LeafSpec(variable_type, dtype, shape, names, rules, note)


@st.composite
def trees(draw: st.DrawFn, depth: int) -> Tree:
    """A module of nesting depth at most `depth`; every module holds at least one leaf."""
    child = leaf_specs()
    if depth > 1:
        sub = trees(depth - 1)
        child = st.one_of(child, sub, st.lists(sub, min_size=1, max_size=2))
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    return {name: draw(child) for name in names}


cases = st.builds(
    Case,
    tree=st.integers(1, 3).flatmap(trees),
    seed=st.integers(0, 2**32 - 1),
    rngs=st.booleans(),
)


# ------------------------------------------------------------------------- builders


def extra_metadata(leaf: LeafSpec) -> dict[str, Any]:
    """What the leaf holds besides its partition names."""
    extra = {} if leaf.rules is None else {"sharding_rules": leaf.rules}
    return extra if leaf.note is None else {**extra, "note": leaf.note}


def make_variable(leaf: LeafSpec, value: np.ndarray) -> nnx.Variable:
    if leaf.names is None:
        return leaf.variable_type(jnp.asarray(value), **extra_metadata(leaf))
    init = nnx.with_partitioning(jnp.asarray, leaf.names, **extra_metadata(leaf))
    return leaf.variable_type(init(value))


def build_module(case: Case) -> Node:
    values = case.values()

    def build(tree: Tree, path: tuple) -> Node:
        node = Node()
        for name, child in tree.items():
            if isinstance(child, LeafSpec):
                value = make_variable(child, values[(*path, name)])
            elif isinstance(child, list):
                value = nnx.List([build(item, (*path, name, i)) for i, item in enumerate(child)])
            else:
                value = build(child, (*path, name))
            setattr(node, name, value)
        return node

    with nnx.use_eager_sharding(False):
        model = build(case.tree, ())
        if case.rngs:
            model.rngs = nnx.Rngs(case.seed)
    return model


def abstract_module(case: Case) -> Node:
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: build_module(case))


def build_linen(case: Case, boxed: bool) -> dict[str, Any]:
    """The Linen variables dict of `case`, collection first, written without bridge."""
    values = case.values()
    out: dict[str, Any] = {}
    for path, linen, leaf in case.leaves():
        value: Any = jnp.asarray(values[path])
        if boxed and leaf.note is not None:
            metadata = extra_metadata(leaf)
            if leaf.names is not None:
                metadata |= {SHARDING_KEY: leaf.names, "mesh": None}
            value = NNXMeta(leaf.variable_type, value, metadata)
        elif boxed and leaf.rules is not None:
            value = nn.LogicallyPartitioned(value, leaf.names, mesh=None, rules=leaf.rules)
        elif boxed and leaf.names is not None:
            value = nn.Partitioned(value, leaf.names, mesh=None)
        *parents, name = linen
        node = out.setdefault(COLLECTION[leaf.variable_type], {})
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return out


# ------------------------------------------------------------------------ assertions


def raw_bits(value: Any) -> np.ndarray:
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    return np.asarray(value)


def assert_same_array(actual: Any, expected: Any, where: object) -> None:
    """Bit-exact: same dtype, same shape, same bytes (bfloat16 and NaN payloads included)."""
    assert isinstance(actual, jax.Array | np.ndarray), (where, type(actual))
    actual, expected = raw_bits(actual), raw_bits(expected)
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
    assert actual.tobytes() == expected.tobytes(), where


def canonical(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with the partitioning key spelled `out_sharding` on every Flax release,
    without Flax's per-process flags and without an empty `mesh`."""
    metadata = {k: v for k, v in metadata.items() if k not in FLAGS}
    if "sharding_names" in metadata:
        metadata["out_sharding"] = metadata.pop("sharding_names")
    if "mesh" in metadata and metadata["mesh"] is None:
        del metadata["mesh"]
    return metadata


def assert_same_model(actual: nnx.Module, expected: nnx.Module, template: nnx.Module) -> None:
    """Same paths, Variable types, metadata and bits. RNG state, which Linen cannot hold,
    must be the template's instead: bit-exact when the template is concrete, of the same
    shape and dtype when it is abstract (bridge re-creates it)."""
    assert type(actual) is type(expected)
    got, want, like = (dict(nnx.to_flat_state(nnx.state(m))) for m in (actual, expected, template))
    assert list(got) == list(want)
    for path, variable in want.items():
        assert type(got[path]) is type(variable), path
        assert canonical(got[path].get_metadata()) == canonical(variable.get_metadata()), path
        value, reference = got[path].get_value(), variable.get_value()
        if isinstance(variable, nnx.RngState):
            reference = like[path].get_value()
        if isinstance(reference, jax.ShapeDtypeStruct):
            assert isinstance(value, jax.Array), (path, value)
            assert (value.shape, value.dtype) == (reference.shape, reference.dtype), path
        else:
            assert_same_array(value, reference, path)


def assert_same_linen(actual: Any, expected: Any, path: tuple = ()) -> None:
    """Same nested keys, same box types and metadata, same bits."""
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), (path, type(actual))
        assert set(actual) == set(expected), (path, sorted(actual), sorted(expected))
        for key, child in expected.items():
            assert_same_linen(actual[key], child, (*path, key))
        return
    boxed = isinstance(expected, meta.AxisMetadata)
    assert isinstance(actual, meta.AxisMetadata) == boxed, (path, actual)
    if isinstance(expected, NNXMeta):
        assert type(actual) is NNXMeta, (path, actual)
        assert actual.var_type is expected.var_type, path
        assert canonical(actual.metadata) == canonical(expected.metadata), path
        actual, expected = actual.value, expected.value
    elif isinstance(expected, meta.AxisMetadata):
        assert type(actual) is type(expected), (path, actual)
        assert (actual.names, actual.mesh) == (expected.names, expected.mesh), path
        assert getattr(actual, "rules", None) == getattr(expected, "rules", None), path
        actual, expected = actual.value, expected.value
    assert_same_array(actual, expected, path)


# ---------------------------------------------------------------------------- tests


def twin(case: Case) -> Case:
    """The same tree with other values (and other RNG keys)."""
    return dataclasses.replace(case, seed=case.seed ^ 1)


@SETTINGS
@given(case=cases)
def test_nnx_to_linen_and_back_is_exact(case: Case) -> None:
    """NNX -> Linen -> NNX gives the model back, whatever the template: the model itself,
    a twin holding other values, or an abstract one."""
    model = build_module(case)
    other = build_module(twin(case))
    templates = (model, other, abstract_module(case))
    for boxed in (False, True):
        variables = bridge.convert(model, to="linen", boxed=boxed)
        for template in templates:
            back = bridge.convert(variables, to="nnx", template=template)
            assert_same_model(back, model, template)
    fresh = build_module(twin(case))
    assert_same_model(other, fresh, fresh)  # templates are left alone


@SETTINGS
@given(case=cases)
def test_nnx_to_linen_matches_hand_built_variables(case: Case) -> None:
    """NNX -> Linen gives the variables dict Linen would hold, boxes included when boxed."""
    model = build_module(case)
    for boxed in (False, True):
        variables = bridge.convert(model, to="linen", boxed=boxed)
        assert_same_linen(variables, build_linen(case, boxed))


@SETTINGS
@given(case=cases, frozen=st.booleans())
def test_linen_to_nnx_and_back_is_exact(case: Case, frozen: bool) -> None:
    """Linen (dict or FrozenDict) -> NNX -> Linen gives the variables back."""
    templates = (abstract_module(case), build_module(twin(case)))
    for boxed, template in itertools.product((False, True), templates):
        variables = build_linen(case, boxed)
        linen = freeze(variables) if frozen else variables
        # source= because detection is order-dependent: until bridge has read an NNX model
        # holding a PropertyCustom, Flax's registry lacks that collection and a plain dict
        # holding it is taken for an nnx_state.
        model = bridge.convert(linen, to="nnx", source="linen", template=template)
        assert_same_linen(bridge.convert(model, to="linen", boxed=boxed), variables)
