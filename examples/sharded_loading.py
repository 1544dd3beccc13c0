"""Recipe: load a checkpoint straight into sharded arrays on a device mesh, each device
reading only its slice of the file. docs/recipes/sharded-loading.md walks through it.

    python examples/sharded_loading.py

Its files go to a temporary directory, removed at exit.
"""

# --8<-- [start:devices]
import os

# 8 simulated CPU devices; XLA reads these before jax starts. Drop both lines on a
# machine with 8 accelerators.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# --8<-- [end:devices]

import tempfile

# --8<-- [start:imports]
import jax
import numpy as np
from flax import nnx

import bridge

# --8<-- [end:imports]

scratch = tempfile.TemporaryDirectory(prefix="bridge-recipe-")  # removed at exit
os.chdir(scratch.name)

# --8<-- [start:load]
rng = np.random.default_rng(0)
weights = {
    "up.weight": rng.normal(size=(8, 16)).astype(np.float32),  # torch Linear: (out, in)
    "up.bias": rng.normal(size=8).astype(np.float32),
    "embed.weight": rng.normal(size=(32, 16)).astype(np.float32),
}
bridge.save(weights, "model.safetensors", format="safetensors")


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("b", "a"))
        embedding_init = nnx.with_partitioning(nnx.initializers.normal(), ("a", None))
        self.up = nnx.Linear(16, 8, kernel_init=kernel_init, rngs=rngs)
        self.embed = nnx.Embed(32, 16, embedding_init=embedding_init, rngs=rngs)


mesh = jax.make_mesh((2, 4), ("a", "b"))
graphdef, abstract_state = nnx.get_abstract_model(lambda: Model(nnx.Rngs(0)), mesh)
template = nnx.merge(graphdef, abstract_state)

model = bridge.convert("model.safetensors", to="nnx", template=template)

kernel = model.up.kernel.get_value()
print(tuple(kernel.sharding.spec), [shard.data.shape for shard in kernel.addressable_shards][:2])
for shard in kernel.addressable_shards:  # each device holds its slice, and only that
    np.testing.assert_array_equal(np.asarray(shard.data), weights["up.weight"].T[shard.index])
np.testing.assert_array_equal(
    np.asarray(model.embed.embedding.get_value()), weights["embed.weight"]
)
# --8<-- [end:load]
