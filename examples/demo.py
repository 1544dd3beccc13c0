"""End to end: an NNX model with BatchNorm and partitioned kernels -> Linen -> NNX.

Prints the plan of each conversion and checks that the Linen module and the NNX model
rebuilt from an abstract template compute exactly what the original computes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bridge

SHARDED = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))


class Classifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.layers = nnx.List(
            [nnx.Linear(8, 16, kernel_init=SHARDED, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)]
        )
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2))
        x = self.dropout(nnx.relu(self.layers[0](x)))
        return self.layers[1](x)


class LinenClassifier(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(8, (3, 3), name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x)).mean(axis=(1, 2))
        x = nn.relu(nn.Dense(16, name="layers_0")(x))
        return nn.Dense(10, name="layers_1")(x)


def main() -> None:
    with nnx.use_eager_sharding(False):  # partition names without a mesh
        model = Classifier(nnx.Rngs(0))
        template = nnx.eval_shape(lambda: Classifier(nnx.Rngs(1)))  # no weights allocated
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    model(images)  # one training step's forward pass: BatchNorm statistics move
    model.eval()
    expected = model(images)

    print(bridge.plan(model, to="linen"), end="\n\n")
    variables = bridge.convert(model, to="linen", boxed=True)
    kernel = variables["params"]["layers_0"]["kernel"]
    print(
        f"Linen collections: {sorted(variables)}; layers_0 kernel box: "
        f"{type(kernel).__name__}(names={kernel.names})"
    )
    linen_out = LinenClassifier().apply(nn.unbox(variables), images)
    print(f"Linen output == NNX output: {np.array_equal(linen_out, expected)}\n")

    print(bridge.plan(variables, to="nnx", template=template), end="\n\n")
    restored = bridge.convert(variables, to="nnx", template=template)
    restored.eval()
    same = np.array_equal(restored(images), expected)
    spec = nnx.get_partition_spec(nnx.state(restored)).layers[0].kernel.get_value()
    print(f"restored NNX output == original: {same}; layers[0].kernel spec: {spec}")
    if not (same and np.array_equal(linen_out, expected)):
        raise SystemExit("outputs differ")
    print("demo passed")


if __name__ == "__main__":
    jnp.zeros(())  # initialise JAX before the prints
    main()
