"""Structural rules: split a fused tensor, merge it back, stack layers into a scanned one."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_same_arrays, assert_state_dicts_equal
from flax import nnx

import bridge

SPLIT_QKV = bridge.Split("qkv.{r}", ["q.{r}", "k.{r}", "v.{r}"], axis=0)


class TorchFused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)


class NnxSeparate(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.q = nnx.Linear(4, 4, rngs=rngs)
        self.k = nnx.Linear(4, 4, rngs=rngs)
        self.v = nnx.Linear(4, 4, rngs=rngs)


def test_split_a_fused_projection_and_merge_it_back():
    torch.manual_seed(0)
    fused = TorchFused()
    template = nnx.eval_shape(lambda: NnxSeparate(nnx.Rngs(0)))
    with pytest.raises(bridge.MismatchError):
        bridge.convert(fused, to="nnx", template=template)
    model = bridge.convert(fused, to="nnx", template=template, rules=[SPLIT_QKV])
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = fused.qkv(x).numpy()
    x = jnp.asarray(x.numpy())
    np.testing.assert_allclose(
        np.concatenate([model.q(x), model.k(x), model.v(x)], axis=-1), expected, atol=1e-6
    )
    rows = {
        row.target: row
        for row in bridge.plan(fused, to="nnx", template=template, rules=[SPLIT_QKV]).rows
    }
    assert rows["k.kernel"].transform == "split 2/3, transpose"
    assert rows["k.kernel"].source == "qkv.weight"

    # Flax kernels are (in, out): the fused axis is the last one there.
    back = bridge.convert(model, to="torch", template=fused, rules=[SPLIT_QKV.inverse(axis=-1)])
    assert torch.equal(back["qkv.weight"], fused.qkv.weight.detach())
    assert torch.equal(back["qkv.bias"], fused.qkv.bias.detach())


class TorchStack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class NnxScanned(nnx.Module):
    """The three layers as one Linear with stacked (3, in, out) parameters, run by scan."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> nnx.Linear:
            return nnx.Linear(4, 4, rngs=rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, layer):
            return jnp.tanh(layer(x))

        return step(x, self.layers)


STACK = bridge.Stack("layers.{i}.{rest*}", "layers.{rest*}", over="i")


def test_stack_per_layer_tensors_into_a_scanned_model_and_back():
    torch.manual_seed(1)
    torch_model = TorchStack()
    template = nnx.eval_shape(lambda: NnxScanned(nnx.Rngs(0)))
    assert template.layers.kernel.shape == (3, 4, 4)
    model = bridge.convert(torch_model, to="nnx", template=template, rules=[STACK])
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    np.testing.assert_allclose(model(jnp.asarray(x.numpy())), expected, atol=1e-6)
    plan = bridge.plan(torch_model, to="nnx", template=template, rules=[STACK])
    row = {row.target: row for row in plan.rows}["layers.kernel"]
    assert (row.source, row.transform) == (
        "layers.0.weight .. layers.2.weight",
        "transpose, stack 3",
    )

    back = bridge.convert(model, to="torch", template=torch_model, rules=[STACK.inverse()])
    assert_state_dicts_equal(back, torch_model.state_dict())

    # the state_dict alone does not say the layers are Linear: tell it
    state = torch_model.state_dict()
    model = bridge.convert(
        state, to="nnx", template=template, rules=[STACK], modules={r"^layers\.\d+$": "Linear"}
    )
    assert_same_arrays(model.layers.kernel.get_value()[1], state["layers.1.weight"].numpy().T)


def test_stack_with_a_gap_in_the_layers_is_reported():
    state = {f"layers.{i}.weight": np.ones((2, 2), np.float32) for i in (0, 2)}
    with pytest.raises(bridge.MismatchError, match=r"layers \[0, 2\].*not 0\.\.1"):
        bridge.convert(state, to="nnx_state", rules=[STACK], modules={".*": "Linear"})


def test_renames_apply_in_order_and_collisions_are_reported():
    state = {"a.weight": np.ones(3, np.float32), "b.weight": np.zeros(3, np.float32)}
    out = bridge.convert(state, to="nnx_state", rules=[(r"^a\.", "x."), (r"^x\.", "y.")])
    assert set(out) == {"y", "b"}
    with pytest.raises(bridge.FormatError, match=r"both 'a.weight' and 'b.weight'"):
        bridge.convert(state, to="nnx_state", rules=[(r"^[ab]\.", "c.")])
    with pytest.raises(TypeError, match="not a rule"):
        bridge.convert(state, to="nnx_state", rules=[{"a": "b"}])


@pytest.mark.parametrize("rule", [("(", "x"), ("a", r"\1"), ("(?P<n>a)", r"\g<m>")])
def test_a_rename_that_is_no_regular_expression_rename_is_a_format_error(rule) -> None:
    state = {"a.w": np.zeros(2, np.float32)}
    with pytest.raises(bridge.FormatError, match="not a regular expression rename"):
        bridge.convert(state, to="nnx_state", rules=[rule])
