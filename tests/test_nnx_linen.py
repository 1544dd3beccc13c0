"""NNX <-> Linen through `bridge.convert`: parity, bit-exact round trips, metadata, names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    LinenNet,
    NnxNet,
    abstract_nnx_net,
    assert_same_arrays,
    leaves_of,
    make_nnx_net,
)
from flax import nnx
from flax.core import FrozenDict

import bridge

pytestmark = pytest.mark.flax_compat


def test_linen_module_applied_to_converted_variables_gives_the_nnx_output(tokens):
    model = make_nnx_net()
    variables = bridge.convert(model, to="linen")
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(LinenNet().apply(variables, tokens), model(tokens))


def test_nnx_model_loaded_from_linen_gives_the_linen_output(tokens):
    variables = LinenNet().init(jax.random.key(3), tokens)
    model = bridge.convert(variables, to="nnx", template=abstract_nnx_net())
    assert isinstance(model, NnxNet)
    np.testing.assert_array_equal(model(tokens), LinenNet().apply(variables, tokens))


@pytest.mark.parametrize("abstract", [False, True], ids=["concrete", "abstract"])
def test_linen_to_nnx_is_bit_exact_and_shares_the_arrays(abstract):
    source = make_nnx_net(seed=1)
    variables = bridge.convert(source, to="linen")
    template = abstract_nnx_net() if abstract else make_nnx_net(seed=2)
    model = bridge.convert(variables, to="nnx", template=template)
    flat = {
        (collection, *path): value
        for collection, tree in variables.items()
        for path, value in nnx.traversals.flatten_mapping(tree).items()
    }
    for path, (var_type, value) in leaves_of(model).items():
        if issubclass(var_type, nnx.RngState):
            continue
        collection = "batch_stats" if var_type is nnx.BatchStat else "params"
        linen_path = (collection, *bridge.tree.linen_path(path))
        assert value is flat.pop(linen_path), path  # rewrapped, not copied
    assert flat == {}


def test_template_is_not_mutated():
    template = make_nnx_net(seed=5)
    before = {
        path: np.asarray(value)
        for path, (_, value) in leaves_of(template).items()
        if path[0] != "drop"
    }
    bridge.convert(bridge.convert(make_nnx_net(seed=6), to="linen"), to="nnx", template=template)
    for path, value in before.items():
        assert_same_arrays(leaves_of(template)[path][1], value)


def test_rng_state_is_dropped_to_linen_and_taken_from_the_template_back():
    plan = bridge.plan(make_nnx_net(), to="linen")
    assert plan.lossy
    assert sorted(plan.report.dropped) == ["drop.rngs.count", "drop.rngs.key"]
    assert "lossy" in str(plan) and "drop.rngs.key" in str(plan)

    template = make_nnx_net(seed=9)
    model = bridge.convert(bridge.convert(make_nnx_net(), to="linen"), to="nnx", template=template)
    np.testing.assert_array_equal(
        jax.random.key_data(model.drop.rngs.key.get_value()),
        jax.random.key_data(template.drop.rngs.key.get_value()),
    )


def test_abstract_template_gets_concrete_rng_state():
    variables = bridge.convert(make_nnx_net(), to="linen")
    model, report = bridge.convert(
        variables, to="nnx", template=abstract_nnx_net(), strict=False, rng_seed=7
    )
    assert report.ok
    key = model.drop.rngs.key.get_value()
    assert not isinstance(key, jax.ShapeDtypeStruct)
    assert any("rng_seed=7" in note for note in report.notes)


def test_to_nnx_state_and_from_frozen_dict():
    variables = FrozenDict(bridge.convert(make_nnx_net(), to="linen"))
    state = bridge.convert(variables, to="nnx_state", template=abstract_nnx_net())
    assert isinstance(state, nnx.State)
    assert isinstance(state["bn"]["mean"], nnx.BatchStat)
    assert isinstance(state["layers"][0]["kernel"], nnx.Param)
    assert_same_arrays(state["bn"]["var"].get_value(), variables["batch_stats"]["bn"]["var"])


def test_linen_to_nnx_state_without_template_keeps_linen_names():
    variables = {
        "params": {"Dense_0": {"kernel": jnp.ones((2, 3))}},
        "batch_stats": {"m": jnp.ones(3)},
    }
    state = bridge.convert(variables, to="nnx_state")
    assert isinstance(state["Dense_0"]["kernel"], nnx.Param)
    assert isinstance(state["m"], nnx.BatchStat)


def test_partitioning_becomes_linen_boxes_and_comes_back():
    model = make_nnx_net()
    plain = bridge.convert(model, to="linen")
    assert isinstance(plain["params"]["layers_0"]["kernel"], jax.Array)

    boxed = bridge.convert(model, to="linen", boxed=True)
    kernel = boxed["params"]["layers_0"]["kernel"]
    assert type(kernel) is nn.Partitioned and kernel.names == ("embed", "mlp")
    assert isinstance(boxed["params"]["layers_1"]["kernel"], jax.Array)

    state = bridge.convert(boxed, to="nnx_state")  # no template: metadata from the boxes
    assert nnx.get_partition_spec(state)["layers_0"]["kernel"].get_value() == jax.P("embed", "mlp")


def test_logically_partitioned_rules_survive_both_ways():
    rules = (("embed", "data"), ("mlp", "model"))
    kernel = nn.LogicallyPartitioned(jnp.ones((2, 3)), ("embed", "mlp"), rules=rules)
    state = bridge.convert({"params": {"dense": {"kernel": kernel}}}, to="nnx_state")
    variable = state["dense"]["kernel"]
    assert variable.get_metadata()["sharding_rules"] == rules
    assert nnx.get_partition_spec(state)["dense"]["kernel"].get_value() == jax.P("data", "model")

    back = bridge.convert(state, to="linen", boxed=True)["params"]["dense"]["kernel"]
    assert type(back) is nn.LogicallyPartitioned
    assert (back.names, back.rules) == (("embed", "mlp"), rules)


class Slow(nnx.Variable):
    """A custom Variable type: its collection is named after the class."""


class WithCustom(nnx.Module):
    def __init__(self) -> None:
        self.ema = Slow(jnp.arange(3.0))
        self.w = nnx.Param(jnp.ones(2))


def test_custom_variable_type_and_custom_collection_both_ways():
    variables = bridge.convert(WithCustom(), to="linen")
    assert set(variables) == {"params", "Slow"}
    model = bridge.convert(variables, to="nnx", template=WithCustom())
    assert type(model.ema) is Slow

    state = bridge.convert(
        {"params": {"w": jnp.ones(2)}, "my_stats": {"s": jnp.zeros(4)}},
        to="nnx_state",
        source="linen",
    )
    custom = state["s"]
    assert type(custom).__name__ == "my_stats" and issubclass(type(custom), nnx.Variable)
    assert set(bridge.convert(state, to="linen")) == {"params", "my_stats"}


class Stack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(2)])


def test_rules_map_linen_names_onto_nnx_attributes():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(3)(x)  # auto-named Dense_0
            return nn.Dense(3)(x)  # Dense_1

    x = jnp.ones((1, 3))
    variables = Mlp().init(jax.random.key(0), x)
    template = nnx.eval_shape(lambda: Stack(nnx.Rngs(0)))
    with pytest.raises(bridge.MismatchError):
        bridge.convert(variables, to="nnx", template=template)
    model = bridge.convert(
        variables, to="nnx", template=template, rules=[(r"^Dense_(\d+)", r"layers.\1")]
    )
    np.testing.assert_array_equal(model.layers[1](model.layers[0](x)), Mlp().apply(variables, x))


def test_mismatches_are_listed_with_expected_found_and_nearest():
    variables = bridge.convert(make_nnx_net(), to="linen")
    params = variables["params"]
    params["layers_1"]["kernal"] = params["layers_1"].pop("kernel")  # misspelt
    params["layers_0"]["bias"] = jnp.zeros(5)  # wrong shape
    params["extra"] = {"w": jnp.zeros(1)}  # unexpected
    before = jax.tree.map(lambda x: x, variables)

    with pytest.raises(bridge.MismatchError) as caught:
        bridge.convert(variables, to="nnx", template=abstract_nnx_net())
    report = caught.value.report
    assert [p.key for p in report.missing] == ["layers.1.kernel"]
    assert report.missing[0].nearest == "params/layers_1/kernal"
    assert report.missing[0].expected == "shape (8, 3) float32 [params]"
    assert sorted(p.key for p in report.unexpected) == ["params/extra/w", "params/layers_1/kernal"]
    assert [p.key for p in report.mismatched] == ["layers.0.bias"]
    assert "(8,)" in report.mismatched[0].expected and "(5,)" in report.mismatched[0].found
    message = str(caught.value)
    assert "layers.1.kernel" in message and "did you mean 'params/layers_1/kernal'" in message
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, variables, before))  # input untouched


def test_non_strict_returns_the_report_and_names_every_abstract_leaf():
    variables = bridge.convert(make_nnx_net(), to="linen")
    del variables["params"]["norm"]
    model, report = bridge.convert(variables, to="nnx", template=abstract_nnx_net(), strict=False)
    assert sorted(p.key for p in report.missing) == ["norm.bias", "norm.scale"]
    assert sorted(report.abstract) == ["norm.bias", "norm.scale"]
    assert isinstance(model.norm.scale.get_value(), jax.ShapeDtypeStruct)
    assert not isinstance(model.layers[0].kernel.get_value(), jax.ShapeDtypeStruct)

    concrete = make_nnx_net(seed=4)
    model, report = bridge.convert(variables, to="nnx", template=concrete, strict=False)
    assert report.abstract == [] and len(report.missing) == 2
    assert model.norm.scale.get_value() is concrete.norm.scale.get_value()


def test_dtype_mismatch_is_reported():
    variables = bridge.convert(make_nnx_net(), to="linen")
    variables["params"]["norm"]["scale"] = variables["params"]["norm"]["scale"].astype(jnp.bfloat16)
    with pytest.raises(bridge.MismatchError, match=r"norm.scale.*float32.*bfloat16"):
        bridge.convert(variables, to="nnx", template=abstract_nnx_net())


def test_two_collections_under_one_path_is_a_format_error():
    variables = {"params": {"x": jnp.ones(2)}, "batch_stats": {"x": jnp.ones(2)}}
    with pytest.raises(bridge.FormatError, match=r"'x'.*both"):
        bridge.convert(variables, to="nnx_state")


def test_worked_case_nnx_linear_through_linen_dense_gives_the_same_sum():
    linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    x = jnp.arange(6.0).reshape(2, 3)
    variables = bridge.convert(linear, to="linen")
    y = nn.Dense(4).apply(variables, x)
    assert float(y.sum()) == float(linear(x).sum())


def test_worked_case_shared_kernel_doubles_the_output():
    linear = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.array([[1.0, 2.0, 3.0]])
    variables = bridge.convert(linear, to="linen")
    assert variables["params"]["kernel"] is linear.kernel.get_value()  # same object, no copy
    total = nn.Dense(2, use_bias=False).apply(variables, x) + linear(x)
    np.testing.assert_allclose(total, 2 * linear(x), rtol=0, atol=0)


def test_nnx_to_linen_into_an_abstract_linen_template(tokens):
    model = make_nnx_net()
    template = jax.eval_shape(LinenNet().init, jax.random.key(0), tokens)
    variables = bridge.convert(model, to="linen", template=template)
    assert jax.tree.structure(variables) == jax.tree.structure(template)
    np.testing.assert_array_equal(LinenNet().apply(variables, tokens), model(tokens))

    del template["params"]["layers_1"]
    with pytest.raises(bridge.MismatchError, match=r"(?s)unexpected.*layers\.1\.kernel"):
        bridge.convert(model, to="linen", template=template)
