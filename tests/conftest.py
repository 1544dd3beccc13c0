"""Shared fixtures: small NNX models and their Linen twins, built the same way in every test."""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))  # tests reuse the examples

PARTITIONED = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))


class NnxNet(nnx.Module):
    """Every layer kind of the foundation issue: Embed, Conv, BatchNorm, LayerNorm, a list
    of Linear layers (one with partitioned kernel) and Dropout (RNG state)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.conv = nnx.Conv(4, 6, (3,), rngs=rngs)
        self.bn = nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.layers = nnx.List(
            [
                nnx.Linear(6, 8, kernel_init=PARTITIONED, rngs=rngs),
                nnx.Linear(8, 3, rngs=rngs),
            ]
        )
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.norm(self.bn(self.conv(self.embed(tokens))))
        x = self.drop(nnx.relu(self.layers[0](x)), deterministic=True)
        return self.layers[1](x)


class LinenNet(nn.Module):
    """The Linen module of the same structure as `NnxNet`."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(10, 4, name="embed")(tokens)
        x = nn.Conv(6, (3,), name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        x = nn.LayerNorm(name="norm")(x)
        x = nn.relu(nn.Dense(8, name="layers_0")(x))
        return nn.Dense(3, name="layers_1")(x)


def make_nnx_net(seed: int = 0) -> NnxNet:
    """A concrete NnxNet whose BatchNorm statistics are not the initial zeros and ones."""
    with nnx.use_eager_sharding(False):
        model = NnxNet(nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    mean, var = model.bn.mean, model.bn.var
    nnx.update(
        model,
        nnx.State(
            {
                "bn": {
                    "mean": mean.replace(value=jnp.asarray(rng.normal(size=6), jnp.float32)),
                    "var": var.replace(value=jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)),
                }
            }
        ),
    )
    return model


def abstract_nnx_net() -> NnxNet:
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0)))


@pytest.fixture
def tokens() -> jax.Array:
    return jnp.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])


def leaves_of(model: nnx.Module) -> dict:
    """`{path: (Variable type, array)}` of a model, for bit-exact comparisons."""
    return {
        tuple(path): (type(var), var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model))
    }


def assert_same_arrays(a, b) -> None:
    """Bit-exact: same dtype, same shape, same bytes (bfloat16 and NaN included)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def assert_state_dicts_equal(ours, expected) -> None:
    """Same keys, and per key the same dtype, shape and values (torch tensors)."""
    import torch  # here: the flax-min CI run has no torch and never calls this

    assert set(ours) == set(expected)
    for key, tensor in expected.items():
        assert ours[key].dtype == tensor.dtype, key
        assert ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key], tensor), key
