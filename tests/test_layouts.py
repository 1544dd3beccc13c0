"""Never reshape to fit: a layout comes from the modules, else from the template's shape
where exactly one layout of the rule family gives it; a reshape only where a rule
declares it (LinearGeneral head splits). Each class has a non-square and a square case,
both directions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_same_arrays
from flax import nnx

import bridge

RNG = np.random.default_rng(0)


def linen_template(**shapes: tuple[int, ...]) -> dict:
    """Abstract Linen params: `{"params": {"fc": {"kernel": (2, 12)}}}` from
    `fc__kernel=(2, 12)` (a template with no module types: only shapes and names)."""
    params: dict = {}
    for key, shape in shapes.items():
        *modules, role = key.split("__")
        node = params
        for name in modules:
            node = node.setdefault(name, {})
        node[role] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return {"params": params}


def torch_module(**layers: torch.nn.Module) -> torch.nn.Module:
    module = torch.nn.Module()
    for name, layer in layers.items():
        module.add_module(name, layer)
    return module


def weights(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


class One(nnx.Module):
    def __init__(self, layer: nnx.Module) -> None:
        self.fc = layer


# --- 1. never reshape to fit -------------------------------------------------------------


@pytest.mark.parametrize("given", ["module", "state_dict"])
def test_a_linear_is_not_reshaped_into_a_template_of_the_same_size(given):
    source = torch_module(fc=torch.nn.Linear(4, 6, bias=False))
    source = source if given == "module" else source.state_dict()
    nnx_template = nnx.eval_shape(lambda: One(nnx.Linear(2, 12, use_bias=False, rngs=nnx.Rngs(0))))
    expected = r"(?s)fc\.kernel.*\(2, 12\).*\(4, 6\).*linear -> \(4, 6\)"
    with pytest.raises(bridge.MismatchError, match=expected):
        bridge.convert(source, to="nnx", template=nnx_template)
    with pytest.raises(bridge.MismatchError, match=r"(?s)\(2, 12\).*identity -> \(6, 4\)"):
        bridge.convert(source, to="linen", template=linen_template(fc__kernel=(2, 12)))


def test_a_bias_is_not_reshaped_unless_its_kernel_is_head_split():
    source = torch_module(fc=torch.nn.Linear(4, 6))
    with pytest.raises(bridge.MismatchError, match=r"(?s)fc/bias.*\(2, 3\).*\(6,\)"):
        bridge.convert(
            source, to="linen", template=linen_template(fc__kernel=(4, 6), fc__bias=(2, 3))
        )


def test_the_modules_decide_when_both_are_known_even_where_another_layout_fits():
    """torch Linear(4, 6) into nnx.Linear(6, 4): the identity would give the template's
    shape, but the two modules compute different functions: refused."""
    source = torch_module(fc=torch.nn.Linear(4, 6, bias=False))
    template = nnx.eval_shape(lambda: One(nnx.Linear(6, 4, use_bias=False, rngs=nnx.Rngs(0))))
    with pytest.raises(bridge.MismatchError, match=r"(?s)fc\.kernel.*\(6, 4\).*linear -> \(4, 6\)"):
        bridge.convert(source, to="nnx", template=template)


@pytest.mark.parametrize("square", [False, True], ids=["non-square", "square"])
def test_linear_into_a_template_without_module_types(square):
    layer = torch.nn.Linear(4, 4 if square else 6, bias=False)
    out = bridge.convert(
        torch_module(fc=layer),
        to="linen",
        template=linen_template(fc__kernel=(4, layer.out_features)),
    )
    assert_same_arrays(out["params"]["fc"]["kernel"], layer.weight.detach().numpy().T)


def conv1d(nx: int, nf: int) -> transformers.pytorch_utils.Conv1D:
    layer = transformers.pytorch_utils.Conv1D(nf, nx)
    torch.nn.init.normal_(layer.weight)
    return layer


def test_conv1d_into_nnx_linear_is_stored_as_it_is_square_or_not():
    source = torch_module(fc=conv1d(4, 6), proj=conv1d(4, 4))

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 6, rngs=rngs)
            self.proj = nnx.Linear(4, 4, rngs=rngs)

    model = bridge.convert(source, to="nnx", template=nnx.eval_shape(lambda: Two(nnx.Rngs(0))))
    assert_same_arrays(model.fc.kernel.get_value(), source.fc.weight.detach().numpy())
    assert_same_arrays(model.proj.kernel.get_value(), source.proj.weight.detach().numpy())


def test_conv1d_into_a_template_that_stores_out_in_transposes_square_ones_too():
    """transformers' FlaxConv1D stores (out, in): the non-square kernels show it, and the
    square kernels of the same torch family follow them, with the reason in the plan."""
    source = torch_module(fc=conv1d(4, 6), up=conv1d(6, 8), proj=conv1d(4, 4))
    template = linen_template(fc__kernel=(6, 4), up__kernel=(8, 6), proj__kernel=(4, 4))
    for name in ("fc", "up", "proj"):
        template["params"][name]["bias"] = jax.ShapeDtypeStruct(
            getattr(source, name).bias.shape, jnp.float32
        )
    out = bridge.convert(source, to="linen", template=template)
    for name in ("fc", "up", "proj"):
        expected = getattr(source, name).weight.detach().numpy().T
        assert_same_arrays(out["params"][name]["kernel"], expected)
    rows = {row.target: row for row in bridge.plan(source, to="linen", template=template).rows}
    assert rows["params/proj/kernel"].transform == "transpose (as the other Conv1D kernels)"
    assert rows["params/fc/kernel"].transform == "transpose (the template's shape)"


def test_a_square_conv1d_is_refused_when_the_other_kernels_disagree():
    source = torch_module(fc=conv1d(4, 6), up=conv1d(6, 8), proj=conv1d(4, 4))
    template = linen_template(fc__kernel=(6, 4), up__kernel=(6, 8), proj__kernel=(4, 4))
    with pytest.raises(bridge.MismatchError, match=r"(?s)proj\.weight.*square.*different layouts"):
        bridge.convert(source, to="linen", template=template)


def test_modules_option_overrides_what_the_torch_module_says():
    source = torch_module(proj=torch.nn.Linear(4, 4, bias=False))
    template = linen_template(proj__kernel=(4, 4))
    plain = bridge.convert(source, to="linen", template=template)
    told = bridge.convert(source, to="linen", template=template, modules={"proj": "Conv1D"})
    weight = source.proj.weight.detach().numpy()
    assert_same_arrays(plain["params"]["proj"]["kernel"], weight.T)
    assert_same_arrays(told["params"]["proj"]["kernel"], weight)


@pytest.mark.parametrize("channels", [(3, 8), (4, 4)], ids=["non-square", "square"])
def test_conv_kernels_are_permuted_and_never_reshaped(channels):
    layer = torch.nn.Conv2d(*channels, 3, bias=False)
    model = bridge.convert(
        torch_module(fc=layer),
        to="nnx",
        template=nnx.eval_shape(
            lambda: One(nnx.Conv(*channels, (3, 3), use_bias=False, rngs=nnx.Rngs(0)))
        ),
    )
    assert_same_arrays(
        model.fc.kernel.get_value(), layer.weight.detach().numpy().transpose(2, 3, 1, 0)
    )
    swapped = nnx.eval_shape(  # (3, 3, out, in): the same size, the wrong layer
        lambda: One(nnx.Conv(channels[1], channels[0], (3, 3), use_bias=False, rngs=nnx.Rngs(0)))
    )
    if channels[0] != channels[1]:
        with pytest.raises(bridge.MismatchError, match=r"(?s)fc\.kernel.*conv -> \(3, 3, 3, 8\)"):
            bridge.convert(torch_module(fc=layer), to="nnx", template=swapped)
    flat = linen_template(fc__kernel=(channels[1], channels[0] * 9))  # same count, 2-D
    with pytest.raises(bridge.MismatchError, match=r"(?s)fc/kernel.*no layout"):
        bridge.convert(torch_module(fc=layer), to="linen", template=flat)


def test_a_declared_head_split_reshapes_and_nothing_else_does():
    layer = torch.nn.Linear(8, 8)
    template = nnx.eval_shape(lambda: One(nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))))
    model = bridge.convert(torch_module(fc=layer), to="nnx", template=template)
    weight, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    assert_same_arrays(model.fc.kernel.get_value(), weight.T.reshape(8, 2, 4))
    assert_same_arrays(model.fc.bias.get_value(), bias.reshape(2, 4))
    back = bridge.convert(model, to="torch", template=torch_module(fc=torch.nn.Linear(8, 8)))
    assert_same_arrays(back["fc.weight"].numpy(), weight)
    assert_same_arrays(back["fc.bias"].numpy(), bias)
    out_projection = torch.nn.Linear(8, 6, bias=False)
    template = nnx.eval_shape(
        lambda: One(nnx.LinearGeneral((2, 4), 6, axis=(-2, -1), use_bias=False, rngs=nnx.Rngs(0)))
    )
    model = bridge.convert(torch_module(fc=out_projection), to="nnx", template=template)
    expected = out_projection.weight.detach().numpy().T.reshape(2, 4, 6)
    assert_same_arrays(model.fc.kernel.get_value(), expected)
    not_a_split = linen_template(fc__kernel=(3, 4, 4))  # 48 elements, but 8 * 6 = (3 * 4) * 4
    with pytest.raises(bridge.MismatchError, match=r"(?s)fc/kernel.*\(3, 4, 4\)"):
        bridge.convert(torch_module(fc=out_projection), to="linen", template=not_a_split)


def test_export_into_a_conv1d_template_from_out_in_kernels():
    """The reverse: Flax kernels stored (out, in) -> a torch Conv1D template."""
    source = torch_module(fc=conv1d(4, 6), up=conv1d(6, 8), proj=conv1d(4, 4))
    kernels = {
        name: RNG.normal(size=getattr(source, name).weight.shape[::-1])
        for name in ("fc", "up", "proj")
    }
    variables = {"params": {name: {"kernel": k.astype(np.float32)} for name, k in kernels.items()}}
    for name in kernels:
        variables["params"][name]["bias"] = np.zeros(getattr(source, name).nf, np.float32)
    state = bridge.convert(variables, to="torch", template=source)
    for name, kernel in kernels.items():
        assert_same_arrays(state[f"{name}.weight"].numpy(), kernel.astype(np.float32).T)
    source.load_state_dict(state, strict=True)


def test_export_refuses_a_kernel_no_layout_gives():
    variables = {"params": {"fc": {"kernel": np.zeros((2, 12), np.float32)}}}
    template = torch_module(fc=torch.nn.Linear(4, 6, bias=False))
    with pytest.raises(bridge.MismatchError, match=r"(?s)fc\.weight.*\(6, 4\).*no layout"):
        bridge.convert(variables, to="torch", template=template)


# --- 2. names and roles from the template ------------------------------------------------


class TorchRmsNorm(torch.nn.Module):
    """transformers' LlamaRMSNorm: a custom module whose parameter is `weight`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width))


@pytest.mark.parametrize("norm", [TorchRmsNorm(4), torch.nn.LayerNorm(4, bias=False)])
def test_a_flax_norm_whose_parameter_is_called_weight_is_filled_without_a_rule(norm):
    template = linen_template(norm__weight=(4,))
    out = bridge.convert(torch_module(norm=norm), to="linen", template=template)
    assert_same_arrays(out["params"]["norm"]["weight"], norm.weight.detach().numpy())
    back = bridge.convert(out, to="torch", template=torch_module(norm=norm))
    assert_same_arrays(back["norm.weight"].numpy(), norm.weight.detach().numpy())


class Buffers(torch.nn.Module):
    """A non-norm module whose buffers happen to carry Flax's names."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.arange(3.0))
        self.register_buffer("scale", torch.full((3,), 2.0))
        self.register_buffer("kernel", torch.ones(3))  # 1-D, named like a Flax kernel
        self.lin = torch.nn.Linear(3, 3)


def test_buffers_called_mean_scale_or_kernel_round_trip_unchanged():
    module = Buffers()
    state = bridge.convert(module, to="nnx_state")
    assert state["mean"].type is nnx.Param  # a buffer named `mean` is no BatchNorm statistic
    back = bridge.convert(state, to="torch", template=Buffers())
    assert sorted(back) == sorted(module.state_dict())
    for key, tensor in module.state_dict().items():
        assert_same_arrays(back[key].numpy(), tensor.numpy())
    with pytest.raises(
        bridge.FormatError, match=r"'(kernel|scale)' and '(scale|kernel)' would both"
    ):
        bridge.convert(state, to="torch")  # without a template both are Flax names: refused


def test_two_source_keys_that_become_one_flax_key_are_refused_naming_both():
    state = {"ln.weight": np.ones(3, np.float32), "ln.scale": np.zeros(3, np.float32)}
    with pytest.raises(bridge.FormatError, match=r"'ln\.(weight|scale)' and 'ln\.(scale|weight)'"):
        bridge.convert(state, to="nnx_state", source="torch", modules={"ln": "Norm"})


def test_an_nnx_state_holding_a_dotted_key_and_its_nesting_is_refused_on_the_way_to_torch():
    state = nnx.State({"a.b": nnx.Param(jnp.zeros(2)), "a": {"b": nnx.Param(jnp.ones(2))}})
    with pytest.raises(bridge.FormatError, match=r"a\.b"):
        bridge.convert(state, to="torch")


# --- 2. Linen modules named '0' ----------------------------------------------------------


def test_linen_modules_named_by_digits_are_reached_by_torch_list_indices():
    """transformers' Flax models name their layers `'0'`, `'1'` (a Linen module name,
    not an automatic `layers_0`); a torch ModuleList's index reaches them, and the output
    keeps the template's spelling."""
    import flax.linen as nn

    class Layers(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = nn.Dense(4, name=str(i))(x)
            return x

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Layers(name="layer")(x)

    template = jax.eval_shape(Model().init, jax.random.key(0), jnp.ones((1, 3)))
    assert set(template["params"]["layer"]) == {"0", "1"}
    source = torch_module(layer=torch.nn.ModuleList([torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)]))
    variables = bridge.convert(source, to="linen", template=template)
    assert set(variables["params"]["layer"]) == {"0", "1"}
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected = source.layer[1](source.layer[0](x)).numpy()
    np.testing.assert_allclose(
        Model().apply(variables, jnp.asarray(x.numpy())), expected, atol=1e-6
    )
    back = bridge.convert(variables, to="torch", template=source)
    for key, tensor in source.state_dict().items():
        assert_same_arrays(back[key].numpy(), tensor.detach().numpy())
    blob = bridge.convert(variables, to="msgpack")
    assert set(bridge.convert(blob, to="linen")["params"]["layer"]) == {"0", "1"}


def test_two_spellings_of_one_position_in_the_template_are_not_guessed_between():
    template = {"params": {"layer": {"0": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32)}}}}
    template["params"]["layer_0"] = {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
    source = {"layer.0.weight": np.zeros((4, 3), np.float32)}
    with pytest.raises(bridge.MismatchError, match=r"(?s)missing.*params/layer/0/kernel"):
        bridge.convert(source, to="linen", template=template, source="torch")
