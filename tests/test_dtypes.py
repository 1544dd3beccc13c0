"""64-bit values are never narrowed in silence: with JAX's default (x64 off) they stay
numpy arrays on the host, exactly; a template with 32-bit leaves narrows them only when
every value survives, and says so."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_same_arrays
from flax import nnx

import bridge

BIG = 2**40 + 5
WIDE = {
    "count": np.array([BIG, -3], np.int64),
    "mask": np.array([2**63 + 1], np.uint64),
    "ratio": np.array([0.1, 1 / 3], np.float64),
}


@pytest.fixture(autouse=True)
def x64_off():
    assert not jax.config.jax_enable_x64  # what every test here is about


@pytest.mark.parametrize("to", ["nnx_state", "linen"])
def test_64_bit_values_survive_a_trip_through_flax_without_a_template(to):
    state = {key: torch.from_numpy(value) for key, value in WIDE.items()}
    flax_state, report = bridge.convert(state, to=to, strict=False)
    assert any("3 64-bit leaves kept as numpy arrays" in note for note in report.notes)
    back = bridge.convert(flax_state, to="torch")
    for key, value in WIDE.items():
        assert back[key].dtype == state[key].dtype
        assert_same_arrays(back[key].numpy(), value)


def test_the_plan_says_64_bit_where_the_values_stay_64_bit():
    rows = {row.target: row.dtype for row in bridge.plan(WIDE, to="nnx_state", source="torch").rows}
    assert rows == {"count": "int64", "mask": "uint64", "ratio": "float64"}


class Counter(nnx.Module):
    def __init__(self) -> None:
        self.count = nnx.Variable(jnp.zeros(2, jnp.int32))
        self.scale = nnx.Param(jnp.zeros(2, jnp.float32))


def test_a_32_bit_template_narrows_only_values_that_survive():
    fits = {"count": np.array([7, -3], np.int64), "scale": np.array([0.5, -2.0], np.float64)}
    model = bridge.convert(fits, to="nnx", template=Counter(), source="torch")
    assert model.count.get_value().dtype == jnp.int32
    assert_same_arrays(model.count.get_value(), np.array([7, -3], np.int32))
    assert_same_arrays(model.scale.get_value(), np.array([0.5, -2.0], np.float32))
    plan = bridge.plan(fits, to="nnx", template=Counter(), source="torch")
    assert {row.target: row.transform for row in plan.rows} == {
        "count": "narrow int64 -> int32",
        "scale": "narrow float64 -> float32",
    }
    assert {row.target: row.dtype for row in plan.rows} == {"count": "int32", "scale": "float32"}


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("count", np.array([7, BIG], np.int64), r"1099511627781.*\(1,\)"),
        ("scale", np.array([0.5, 0.1], np.float64), r"0\.1.*\(1,\)"),
    ],
)
def test_a_value_that_would_change_is_a_mismatch(key, value, shown):
    state = {"count": np.zeros(2, np.int64), "scale": np.zeros(2, np.float64), key: value}
    with pytest.raises(bridge.MismatchError, match=rf"(?s){key}.*would change {shown}"):
        bridge.convert(state, to="nnx", template=Counter(), source="torch")
    model, report = bridge.convert(
        state, to="nnx", template=Counter(), source="torch", strict=False
    )
    assert [problem.key for problem in report.mismatched] == [key]
    assert_same_arrays(getattr(model, key).get_value(), np.zeros(2, getattr(Counter(), key).dtype))


def test_a_nan_payload_counts_as_a_change():
    payload = np.array([0x7FF8000000000123], np.uint64).view(np.float64)
    state = {"count": np.zeros(2, np.int64), "scale": np.concatenate([payload, [1.0]])}
    with pytest.raises(bridge.MismatchError, match="scale"):
        bridge.convert(state, to="nnx", template=Counter(), source="torch")
