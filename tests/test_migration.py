"""A Linen training run, migrated to NNX mid-way, continues exactly as it would have."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
from mlp_models import LinenMlp, NnxMlp, TrainState  # the recipe's models

import bridge

STEPS = 3


def batches(count: int):
    rng = np.random.default_rng(0)
    return [
        (
            jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
        )
        for _ in range(count)
    ]


@jax.jit
def linen_step(state: TrainState, x, y) -> TrainState:
    def loss(params):
        out, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean((out - y) ** 2), updates

    grads, updates = jax.grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])


@nnx.jit
def nnx_step(model: NnxMlp, optimizer: nnx.Optimizer, x, y) -> None:
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)


def trained_linen_state() -> TrainState:
    x = jnp.ones((4, 3))
    variables = LinenMlp().init(jax.random.key(0), x)
    state = TrainState.create(
        apply_fn=LinenMlp().apply,
        params=variables["params"],
        tx=optax.adam(1e-2),
        batch_stats=variables["batch_stats"],
    )
    for x, y in batches(STEPS):
        state = linen_step(state, x, y)
    return state


@pytest.mark.parametrize("given", ["train_state", "state_dict"])
def test_migrated_training_continues_exactly_as_in_linen(given):
    state = trained_linen_state()
    checkpoint = state if given == "train_state" else serialization.to_state_dict(state)
    model_template = nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0)))
    optimizer_template = nnx.eval_shape(
        lambda: nnx.Optimizer(NnxMlp(nnx.Rngs(0)), optax.adam(1e-2), wrt=nnx.Param)
    )
    model, optimizer = bridge.migrate(
        checkpoint, model=model_template, optimizer=optimizer_template
    )
    assert int(optimizer.step.get_value()) == STEPS
    np.testing.assert_array_equal(
        optimizer.opt_state[0].mu["layers"][0]["kernel"].get_value(),
        state.opt_state[0].mu["layers_0"]["kernel"],
    )

    for x, y in batches(2 * STEPS)[STEPS:]:  # both runs continue: bit for bit the same
        state = linen_step(state, x, y)
        nnx_step(model, optimizer, x, y)
    np.testing.assert_array_equal(
        model.layers[0].kernel.get_value(), state.params["layers_0"]["kernel"]
    )
    np.testing.assert_array_equal(model.bn.var.get_value(), state.batch_stats["bn"]["var"])
    assert int(optimizer.step.get_value()) == int(state.step) == 2 * STEPS


def test_migration_without_optimizer_gives_the_model():
    state = trained_linen_state()
    model = bridge.migrate(state, model=nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0))))
    np.testing.assert_array_equal(
        model.layers[1].bias.get_value(), state.params["layers_1"]["bias"]
    )


def test_optimizer_of_another_transformation_is_a_mismatch():
    state = trained_linen_state()
    sgd = nnx.eval_shape(
        lambda: nnx.Optimizer(NnxMlp(nnx.Rngs(0)), optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    )
    with pytest.raises(bridge.MismatchError, match="opt_state"):
        bridge.migrate(state, model=nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0))), optimizer=sgd)


@pytest.mark.parametrize("stored", ["msgpack", "orbax"])
def test_migration_from_checkpoint_files(tmp_path, stored):
    import orbax.checkpoint as ocp

    state = trained_linen_state()
    if stored == "msgpack":
        checkpoint = serialization.to_bytes(state)  # what flax.training.checkpoints wrote
    else:
        checkpoint = tmp_path / "ckpt"
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(checkpoint, serialization.to_state_dict(state))
        checkpointer.wait_until_finished()
    optimizer_template = nnx.eval_shape(
        lambda: nnx.Optimizer(NnxMlp(nnx.Rngs(0)), optax.adam(1e-2), wrt=nnx.Param)
    )
    model, optimizer = bridge.migrate(
        checkpoint, model=nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0))), optimizer=optimizer_template
    )
    assert int(optimizer.step.get_value()) == STEPS
    for x, y in batches(2 * STEPS)[STEPS:]:
        state = linen_step(state, x, y)
        nnx_step(model, optimizer, x, y)
    np.testing.assert_array_equal(
        model.layers[1].kernel.get_value(), state.params["layers_1"]["kernel"]
    )
