"""One state across every pair of formats the graph connects, and back, bit for bit.

The state: an NNX model with Embed, Conv, BatchNorm (statistics), LayerNorm, a list of
Linear layers and a partitioned kernel; its twin torch module gives the torch side its
module types. A -> B -> A must give A's leaves back bit-exactly; B keeps the
partitioning metadata where it can hold it, and its conversion reports the loss where
it cannot.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import bridge
from bridge.graph import GRAPH, Context
from bridge.tree import match_key

FORMATS = ["nnx", "nnx_state", "linen", "torch", "safetensors", "orbax", "msgpack"]
HOLDS_METADATA = {"nnx", "nnx_state", "linen", "orbax"}
SHARDED = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(11, 4, rngs=rngs)
        self.conv = nnx.Conv(4, 6, (3,), rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.layers = nnx.List(
            [nnx.Linear(6, 5, kernel_init=SHARDED, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)]
        )


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.conv = torch.nn.Conv1d(4, 6, 3)
        self.bn = torch.nn.BatchNorm1d(6)
        self.norm = torch.nn.LayerNorm(6)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)])


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, 4, name="embed")(tokens)
        x = nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(6, (3,), name="conv")(x))
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(3, name="layers_1")(nn.Dense(5, name="layers_0")(x))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The state in every format, and what each format needs to be written."""
    with nnx.use_eager_sharding(False):
        model = Net(nnx.Rngs(0))
        abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    nnx.update(
        model,
        nnx.State(
            {
                "bn": {
                    "mean": model.bn.mean.replace(
                        value=jnp.asarray(rng.normal(size=6), jnp.float32)
                    ),
                    "var": model.bn.var.replace(
                        value=jnp.asarray(rng.uniform(1, 2, 6), jnp.float32)
                    ),
                }
            }
        ),
    )
    torch_model = TorchNet()
    torch_model.load_state_dict(bridge.convert(model, to="torch", template=torch_model))
    directory = tmp_path_factory.mktemp("matrix")
    counter = itertools.count()
    linen_template = jax.eval_shape(LinenNet().init, jax.random.key(0), jnp.ones((1, 5), int))

    def options(target: str, source: str = "nnx") -> dict:
        """How to convert into `target`. A torch state_dict does not say that `conv` is a
        Conv (not a ConvTranspose): into Linen, whose variables do not say either, the
        caller tells."""
        name = directory / f"{next(counter)}"
        if source in ("torch", "safetensors") and target == "orbax":
            return {"path": name, "template": abstract}
        if source in ("torch", "safetensors") and target in ("linen", "msgpack"):
            return {"template": linen_template, "modules": {"^conv$": "Conv"}} | (
                {"boxed": True} if target == "linen" else {}
            )
        return {
            "nnx": {"template": abstract},
            "nnx_state": {"template": abstract},
            "linen": {"template": linen_template, "boxed": True},
            "torch": {"template": torch_model},
            "safetensors": {"template": torch_model, "path": name.with_suffix(".safetensors")},
            "orbax": {"path": name},
            "msgpack": {"template": linen_template},
        }[target]

    reps = {"nnx": model, "nnx_state": nnx.state(model), "torch": torch_model.state_dict()}
    for target in ("linen", "safetensors", "orbax", "msgpack"):
        reps[target] = bridge.convert(model, to=target, **options(target))
    return reps, options


def leaves(obj, fmt: str) -> dict:
    """The format's own reading of `obj`: {key: (dtype, bytes, metadata)}, keyed by the
    spelling-independent key (an Orbax checkpoint written from Linen variables spells
    `layers_0` where one written from NNX spells `layers/0`)."""
    flat = GRAPH.format(fmt).read(obj, Context())
    return {
        match_key(path): (str(leaf.dtype), np.asarray(leaf.value).tobytes(), dict(leaf.metadata))
        for path, leaf in flat.items()
    }


def kernel_metadata(obj, fmt: str) -> dict:
    """The metadata of the partitioned kernel, as the format reads it back."""
    flat = GRAPH.format(fmt).read(obj, Context())
    return next(
        dict(leaf.metadata) for path, leaf in flat.items() if match_key(path) == "layers_0/kernel"
    )


@pytest.mark.parametrize(("a", "b"), [(a, b) for a in FORMATS for b in FORMATS if a != b])
def test_round_trip_is_bit_exact(world, a, b):
    reps, options = world
    there, report = bridge.convert(reps[a], to=b, strict=False, **options(b, a))
    assert report.ok, report
    back, report_back = bridge.convert(there, to=a, strict=False, **options(a, b))
    assert report_back.ok, report_back
    returned, original = leaves(back, a), leaves(reps[a], a)
    if b not in HOLDS_METADATA:  # reported below; the values must come back all the same
        returned, original = ({k: v[:2] for k, v in d.items()} for d in (returned, original))
    assert returned == original

    if a in HOLDS_METADATA and b in HOLDS_METADATA:
        assert kernel_metadata(there, b)["out_sharding"] == ("embed", "mlp")
    elif a in HOLDS_METADATA:  # b cannot hold it: the conversion says so
        said = " ".join(report.dropped) + " ".join(str(e) for e in bridge.route(a, b))
        assert "metadata" in said.lower(), (report, bridge.route(a, b))
