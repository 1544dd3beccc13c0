"""Per-leaf cost: bridge walks an NNX template's graph once per conversion (each walk
of a 50,000-leaf graph costs as much as the rest of the conversion)."""

from __future__ import annotations

import contextlib
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import graphlib

import bridge
from bridge import collector
from bridge.formats.nnx import read_module
from bridge.graph import Context
from bridge.layout import FLAX_FAMILIES, family
from bridge.tree import STAGED_BYTES


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(3, 2, rngs=rngs)


class Many(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([Block(rngs) for _ in range(3)])


def test_a_conversion_into_nnx_walks_the_template_once(monkeypatch):
    template = nnx.eval_shape(lambda: Many(nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    state_dict = {}
    for i in range(3):
        state_dict[f"blocks.{i}.lin.weight"] = rng.standard_normal((2, 3), np.float32)
        state_dict[f"blocks.{i}.lin.bias"] = rng.standard_normal((2,), np.float32)
    walks = []
    flatten = graphlib.flatten
    monkeypatch.setattr(graphlib, "flatten", lambda *a, **k: walks.append(a) or flatten(*a, **k))

    model = bridge.convert(state_dict, to="nnx", template=template, progress=False)

    assert len(walks) == 1
    for i in range(3):
        kernel = np.asarray(model.blocks[i].lin.kernel.get_value())
        assert kernel.tobytes() == state_dict[f"blocks.{i}.lin.weight"].T.tobytes()


class _Box:
    """A pytree node that holds a module but answers neither items nor attributes."""

    def __init__(self, inner: nnx.Module) -> None:
        self.inner = inner


jax.tree_util.register_pytree_node(_Box, lambda box: ((box.inner,), None), lambda _, c: _Box(*c))


class Mixed(nnx.Module):
    """Modules under attributes, shared, in an `nnx.Dict`, a list and a dict pytree, and
    (with `box`) in a custom pytree node."""

    def __init__(self, rngs: nnx.Rngs, box: bool) -> None:
        shared = nnx.Linear(2, 2, rngs=rngs)
        self.a, self.b = shared, shared
        self.d = nnx.Dict(conv=nnx.Conv(2, 2, (3,), rngs=rngs), norm=nnx.LayerNorm(2, rngs=rngs))
        self.plain = nnx.data([nnx.Embed(4, 2, rngs=rngs), {"x": nnx.Linear(2, 3, rngs=rngs)}])
        if box:
            self.box = nnx.data(_Box(nnx.BatchNorm(2, rngs=rngs)))


@pytest.mark.parametrize("box", [False, True])
def test_each_leaf_knows_the_family_of_the_module_the_graph_puts_it_in(box, monkeypatch):
    model = Mixed(nnx.Rngs(0), box)
    owners = {
        path: family(type(node), FLAX_FAMILIES)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module)
    }
    walks = []
    iter_graph = nnx.iter_graph
    monkeypatch.setattr(nnx, "iter_graph", lambda *a: walks.append(a) or iter_graph(*a))

    flat = read_module(model, Context())

    assert {path: leaf.module for path, leaf in flat.items()} == {
        path: owners.get(path[:-1]) for path, _ in nnx.to_flat_state(nnx.state(model))
    }
    assert {"Linear", "Conv", "Norm", "Embedding"} <= {leaf.module for leaf in flat.values()}
    assert len(walks) == box  # a second walk only where a path cannot be followed


class Doubled(nnx.Param):
    """A Variable type of its own whose value is not what it holds."""

    def get_value(self, **kwargs):
        return super().get_value(**kwargs) * 2


class Held(nnx.Module):
    def __init__(self) -> None:
        self.plain = nnx.Param(jnp.arange(3.0))
        self.own = Doubled(jnp.arange(3.0))
        self.ref = nnx.Param(jnp.arange(2.0), ref=True)
        with pytest.warns(UserWarning, match="hooks are deprecated"):
            self.hooked = nnx.Param(jnp.arange(4.0), on_get_value=lambda _, value: value + 1)


def test_reading_a_variable_gives_what_its_get_value_gives():
    model = Held()
    names = ("plain", "own", "ref", "hooked")
    expected = {name: np.asarray(getattr(model, name).get_value()) for name in names}

    variables = bridge.convert(model, to="linen", progress=False)
    params = {
        name: value for collection in variables.values() for name, value in collection.items()
    }

    assert set(params) == set(expected)
    for name, value in expected.items():
        assert np.asarray(params[name]).tobytes() == value.tobytes(), name
    assert not np.array_equal(expected["own"], np.arange(3.0))  # the test tells them apart


class Two(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.small = nnx.Linear(3, 2, rngs=rngs)
        self.large = nnx.Linear(300, 200, rngs=rngs)  # a kernel over STAGED_BYTES


def test_transposed_kernels_are_placed_bit_exact_below_and_above_the_staging_size():
    template = nnx.eval_shape(lambda: Two(nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    state_dict = {}
    for name, (i, o) in {"small": (3, 2), "large": (300, 200)}.items():
        state_dict[f"{name}.weight"] = rng.standard_normal((o, i), np.float32)
        state_dict[f"{name}.bias"] = rng.standard_normal((o,), np.float32)
    assert state_dict["large.weight"].nbytes > STAGED_BYTES >= state_dict["small.weight"].nbytes

    model = bridge.convert(state_dict, to="nnx", template=template, progress=False)

    for name in ("small", "large"):
        kernel = np.asarray(getattr(model, name).kernel.get_value())
        assert kernel.tobytes() == np.ascontiguousarray(state_dict[f"{name}.weight"].T).tobytes()


@pytest.fixture
def collections(monkeypatch):
    """The collections Python's cyclic collector makes, with a collection due at every
    allocation (so that any stretch of code the collector is on in runs one)."""
    made: list[int] = []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            made.append(info["generation"])

    threshold = gc.get_threshold()
    gc.set_threshold(1)
    gc.callbacks.append(note)
    try:
        yield made
    finally:
        gc.callbacks.remove(note)
        gc.set_threshold(*threshold)


def _state_dict() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"blocks.{i}.lin.{name}": rng.standard_normal(shape, np.float32)
        for i in range(3)
        for name, shape in (("weight", (2, 3)), ("bias", (2,)))
    }


def test_a_conversion_to_an_object_builds_it_with_the_collector_paused(collections, monkeypatch):
    """Paused while leaves, matches and the model are built: with a collection due at
    every allocation, a call makes a few (entering and leaving), not one per object."""
    template = nnx.eval_shape(lambda: Many(nnx.Rngs(0)))
    state_dict = _state_dict()
    bridge.convert(state_dict, to="nnx", template=template, progress=False)  # warm caches
    collections.clear()

    model = bridge.convert(state_dict, to="nnx", template=template, progress=False)
    paused = len(collections)
    collections.clear()
    monkeypatch.setattr(collector, "paused", contextlib.nullcontext)
    bridge.convert(state_dict, to="nnx", template=template, progress=False)

    assert paused * 20 < len(collections), (paused, len(collections))
    assert gc.isenabled()
    kernel = np.asarray(model.blocks[2].lin.kernel.get_value())
    assert kernel.tobytes() == state_dict["blocks.2.lin.weight"].T.tobytes()


def test_a_file_is_written_with_the_collector_on(collections, tmp_path):
    """A file's writer (Orbax's event loop, say) runs as it would without bridge."""
    bridge.save(_state_dict(), tmp_path / "out.safetensors", format="safetensors", progress=False)

    assert collections != []


def test_the_collector_is_as_it_was_after_a_conversion_that_fails():
    template = nnx.eval_shape(lambda: Many(nnx.Rngs(0)))
    short = dict(list(_state_dict().items())[:-1])
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            with pytest.raises(bridge.MismatchError):
                bridge.convert(short, to="nnx", template=template, progress=False)
            assert gc.isenabled() is enabled
        finally:
            gc.enable()


def _bridge_garbage(call) -> list[str]:
    """What of bridge's own `call()` leaves in reference cycles (its result kept)."""
    call()  # imports and caches first
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        result = call()
        gc.collect()
        found = [
            f"{type(thing).__name__} {getattr(thing, '__qualname__', '')}"
            for thing in gc.garbage
            if (getattr(thing, "__module__", None) or "").startswith("bridge")
            or (getattr(type(thing), "__module__", None) or "").startswith("bridge")
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    del result
    return found


def test_no_conversion_leaves_objects_of_bridge_in_cycles(tmp_path):
    """The collector is paused while bridge works: whatever bridge makes must be freed by
    reference counting (a closure calling itself, say, is a cycle the pause would keep)."""
    template = nnx.eval_shape(lambda: Many(nnx.Rngs(0)))
    state_dict = _state_dict()
    model = bridge.convert(state_dict, to="nnx", template=template, progress=False)
    file = bridge.save(state_dict, tmp_path / "model.safetensors", format="safetensors")
    calls = {
        "torch -> nnx": lambda: bridge.convert(
            state_dict, to="nnx", template=template, progress=False
        ),
        "safetensors -> nnx": lambda: bridge.load(file, "nnx", template=template, progress=False),
        "nnx -> msgpack": lambda: bridge.save(
            model, tmp_path / "m.msgpack", format="msgpack", overwrite=True, progress=False
        ),
        "nnx -> linen": lambda: bridge.convert(model, to="linen", progress=False),
        "plan": lambda: bridge.plan(state_dict, to="nnx", template=template, rules="auto"),
        "a mismatch, reported": lambda: bridge.convert(
            {**state_dict, "blocks.0.lin.weight": np.zeros((5, 5), np.float32)},
            to="nnx",
            template=template,
            strict=False,
            progress=False,
        ),
    }
    for name, call in calls.items():
        assert _bridge_garbage(call) == [], name
