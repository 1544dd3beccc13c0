"""Recipe: a Linen training checkpoint (a `TrainState` with `params`, `batch_stats` and
an optax `opt_state`) into an NNX model and `nnx.Optimizer`, so that training resumes
where it stopped. docs/recipes/linen-checkpoint-to-nnx.md walks through it.

    python examples/linen_checkpoint_to_nnx.py
"""

# --8<-- [start:linen-run]
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization
from mlp_models import LinenMlp, NnxMlp, TrainState

import bridge

x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
variables = LinenMlp().init(jax.random.key(0), x)
state = TrainState.create(
    apply_fn=LinenMlp().apply,
    params=variables["params"],
    tx=optax.adam(1e-2),
    batch_stats=variables["batch_stats"],
)


def loss(params, state):
    out, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    return jnp.mean((out - y) ** 2), updates


grads, updates = jax.grad(loss, has_aux=True)(state.params, state)
state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
checkpoint = serialization.to_bytes(state)  # what flax.training.checkpoints wrote
# --8<-- [end:linen-run]


# --8<-- [start:migrate]
model_template = nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0)))
optimizer_template = nnx.eval_shape(
    lambda: nnx.Optimizer(NnxMlp(nnx.Rngs(0)), optax.adam(1e-2), wrt=nnx.Param)
)
model, optimizer = bridge.migrate(checkpoint, model=model_template, optimizer=optimizer_template)

print("step:", optimizer.step.get_value())
np.testing.assert_array_equal(
    model.layers[0].kernel.get_value(), state.params["layers_0"]["kernel"]
)
np.testing.assert_array_equal(
    optimizer.opt_state[0].mu["layers"][0]["kernel"].get_value(),
    state.opt_state[0].mu["layers_0"]["kernel"],
)
np.testing.assert_array_equal(model.bn.var.get_value(), state.batch_stats["bn"]["var"])
# --8<-- [end:migrate]


# --8<-- [start:train]
@nnx.jit
def train_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)


train_step(model, optimizer, x, y)
print("step after one more NNX step:", optimizer.step.get_value())
# --8<-- [end:train]
