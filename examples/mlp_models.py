"""The models of the Linen -> NNX migration recipe: a Linen MLP with BatchNorm, the
`TrainState` that carries its batch statistics, and the NNX twin of the MLP (same
structure: `nnx.List` items `layers[0]` meet Linen's `layers_0`)."""

import flax.linen as nn
from flax import nnx
from flax.training import train_state


class LinenMlp(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(8, name="layers_0")(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(2, name="layers_1")(x)


class TrainState(train_state.TrainState):
    batch_stats: dict


class NnxMlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)])
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        return self.layers[1](self.bn(nnx.relu(self.layers[0](x))))
