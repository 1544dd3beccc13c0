"""The graph of formats: registration, routing, detection, plans, and a user format."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import abstract_nnx_net, make_nnx_net
from flax import nnx

import bridge
from bridge.graph import Edge, Format, Graph
from bridge.tree import Leaf, dotted, parse_dotted

pytestmark = pytest.mark.flax_compat


def _graph(*edges: Edge) -> Graph:
    graph = Graph()
    for name in sorted({end for edge in edges for end in (edge.src, edge.dst)} | {"island"}):
        graph.add_format(Format(name, lambda obj: 0.0, None, None))  # type: ignore[arg-type]
    for edge in edges:
        graph.add_edge(edge)
    return graph


def test_route_takes_the_cheapest_path():
    graph = _graph(Edge("a", "b", cost=1), Edge("b", "d", cost=1), Edge("a", "c"), Edge("c", "d"))
    assert [(e.src, e.dst) for e in graph.route("a", "d")] == [("a", "c"), ("c", "d")]
    assert graph.route("a", "a") == []


def test_route_is_lossy_only_when_no_lossless_route_exists():
    cheap_lossy = Edge("a", "d", lossy=True)
    graph = _graph(cheap_lossy, Edge("a", "b", cost=5), Edge("b", "d", cost=5))
    assert [e.dst for e in graph.route("a", "d")] == ["b", "d"]
    assert _graph(cheap_lossy).route("a", "d") == [cheap_lossy]


def test_edges_whose_needs_are_unmet_are_skipped_and_the_error_says_what_to_pass():
    graph = _graph(Edge("a", "d", needs=frozenset({"template"})), Edge("a", "b"))
    assert len(graph.route("a", "d", have={"template"})) == 1
    with pytest.raises(bridge.NoRouteError, match=r"a -> d needs template.*pass template=\.\.\."):
        graph.route("a", "d", have=set())


def test_missing_route_names_both_sides_of_the_missing_edge():
    graph = _graph(Edge("a", "b"), Edge("c", "d"))
    with pytest.raises(bridge.NoRouteError) as caught:
        graph.route("a", "d")
    message = str(caught.value)
    assert "'a' reaches ['a', 'b']" in message and "'d' is reached from ['c', 'd']" in message
    with pytest.raises(bridge.NoRouteError, match="unknown format 'nope'"):
        graph.route("a", "nope")


def test_builtin_routes():
    assert [(e.src, e.dst) for e in bridge.route("nnx", "linen")] == [
        ("nnx", "nnx_state"),
        ("nnx_state", "linen"),
    ]
    assert bridge.route("nnx", "linen")[-1].lossy
    assert {"nnx", "nnx_state", "linen"} <= set(bridge.registered_formats())
    with pytest.raises(bridge.NoRouteError, match="needs template"):
        bridge.convert({"params": {"w": jnp.ones(2)}}, to="nnx")


def test_bridge_formats_is_the_package_of_adapters_and_the_registry_has_its_own_name():
    """`import bridge.formats.x as y` reaches the adapter module (a function of the same
    name used to shadow the package); the formats by name are `registered_formats()`."""
    import types

    import bridge.formats.orbax as orbax_adapter
    import bridge.formats.safetensors as safetensors_adapter

    assert isinstance(bridge.formats, types.ModuleType)
    assert safetensors_adapter is bridge.formats.safetensors
    assert orbax_adapter.__name__ == "bridge.formats.orbax"
    assert "formats" in bridge.__all__ and "registered_formats" in bridge.__all__
    registered = bridge.registered_formats()
    assert {"torch", "safetensors", "nnx", "nnx_state", "linen", "orbax", "msgpack"} <= set(
        registered
    )
    assert all(isinstance(fmt, Format) and fmt.name == name for name, fmt in registered.items())
    registered.clear()  # a copy: the registry is not the caller's to change
    assert "orbax" in bridge.registered_formats()


def test_detect():
    assert bridge.detect(make_nnx_net()) == "nnx"
    assert bridge.detect(abstract_nnx_net()) == "nnx"
    assert bridge.detect(nnx.state(make_nnx_net())) == "nnx_state"
    assert bridge.detect({"params": {"w": jnp.ones(2)}, "batch_stats": {}}) == "linen"
    assert bridge.detect({"params": {"w": jnp.ones(2)}, "losses": {"x": jnp.ones(())}}) == "linen"
    assert bridge.detect(nnx.to_pure_dict(nnx.state(make_nnx_net()))) == "nnx_state"
    with pytest.raises(bridge.FormatError, match=r"(?s)builtins.list.*none of.*linen"):
        bridge.detect([1, 2])
    with pytest.raises(bridge.FormatError, match="source="):
        bridge.detect({"params": 3})


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="boxd"):
        bridge.convert(make_nnx_net(), to="linen", boxd=True)


def test_plan_moves_no_data_and_prints_a_table():
    model = make_nnx_net()
    plan = bridge.plan(model, to="linen")
    rows = {row.target: row for row in plan.rows}
    kernel = rows["params/layers_0/kernel"]
    assert (kernel.source, kernel.dtype, kernel.nbytes) == ("layers.0.kernel", "float32", 6 * 8 * 4)
    assert "batch_stats/bn/mean" in rows
    text = str(plan)
    assert text.splitlines()[0].startswith("plan nnx -> linen: nnx -> nnx_state")
    assert "layers.0.kernel" in text and "params/layers_0/kernel" in text
    assert plan.nbytes == sum(row.nbytes for row in plan.rows)

    template = abstract_nnx_net()
    plan = bridge.plan(bridge.convert(model, to="linen"), to="nnx", template=template)
    assert {row.target for row in plan.rows} >= {"layers.0.kernel", "bn.mean"}
    assert plan.report.ok


class NpzState(dict):
    """A user format: a flat dict of numpy arrays under dotted keys, as `np.savez` keeps."""


def test_a_user_format_registers_in_a_few_lines_and_convert_routes_through_it():
    if "npz_state" not in bridge.registered_formats():
        bridge.register_format(
            "npz_state",
            detect=lambda obj: float(isinstance(obj, NpzState)),
            read=lambda obj, ctx: {parse_dotted(k): Leaf(v, kind="params") for k, v in obj.items()},
            write=lambda flat, ctx: NpzState(
                {dotted(p): np.asarray(leaf.value) for p, leaf in flat.items()}
            ),
            description="a flat dict of numpy arrays",
        )
        bridge.register_conversion("npz_state", "nnx_state")
        bridge.register_conversion("nnx_state", "npz_state", cost=1.0)

    linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    exported = bridge.convert(linear, to="npz_state")
    assert isinstance(exported, NpzState) and set(exported) == {"kernel", "bias"}
    assert bridge.detect(exported) == "npz_state"

    variables = bridge.convert(exported, to="linen")  # npz_state -> nnx_state -> linen
    np.testing.assert_array_equal(variables["params"]["kernel"], linear.kernel.get_value())
    back = bridge.convert(exported, to="nnx", template=nnx.Linear(2, 3, rngs=nnx.Rngs(1)))
    np.testing.assert_array_equal(back(jnp.ones((1, 2))), linear(jnp.ones((1, 2))))


def test_progress_bar_counts_bytes_and_is_off_when_not_a_terminal(capsys):
    model = make_nnx_net()
    bridge.convert(model, to="linen")  # stderr is captured here: not a terminal
    assert capsys.readouterr().err == ""
    bridge.convert(model, to="linen", progress=True)
    bar = capsys.readouterr().err
    total = bridge.plan(model, to="linen").nbytes
    final = bar.rstrip().rsplit("\r", 1)[-1]
    assert final.startswith("loading: 100%") and f"{total}/{total}" in final, final


@pytest.mark.parametrize(
    ("format", "name", "verb"),
    [
        ("safetensors", "m.safetensors", "saving"),
        ("msgpack", "m.msgpack", "saving"),
        ("orbax", "ckpt", "reading"),
    ],
)
def test_saves_show_a_bar_over_every_tensor(capsys, tmp_path, format, name, verb):
    model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))  # 120 bytes: tqdm prints them unscaled
    total = sum(array.nbytes for array in jax.tree.leaves(nnx.state(model)))
    bridge.save(model, tmp_path / name, format=format, progress=True)
    final = capsys.readouterr().err.rstrip().rsplit("\r", 1)[-1]
    assert final.startswith(f"{verb}: 100%") and f"{total}/{total}" in final, final
