"""`convert` on a Linen training checkpoint loads the model state, under strict=True:
the training state (step, opt_state) is recognised, set aside and reported, with a
pointer to `bridge.migrate`."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import assert_same_arrays
from flax import nnx, serialization
from mlp_models import NnxMlp
from test_migration import trained_linen_state

import bridge


@pytest.fixture(scope="module")
def state():
    return trained_linen_state()


def stored(kind: str, state, tmp_path):
    """The TrainState as a user would have kept it."""
    if kind == "state_dict":
        return serialization.to_state_dict(state)
    if kind == "msgpack_bytes":
        return serialization.to_bytes(state)
    if kind == "msgpack_file":
        path = tmp_path / "state.msgpack"
        path.write_bytes(serialization.to_bytes(state))
        return path
    path = tmp_path / "ckpt"
    if kind == "orbax_manager":
        with ocp.CheckpointManager(path) as manager:
            manager.save(7, args=ocp.args.StandardSave(state))
        return path
    with ocp.StandardCheckpointer() as checkpointer:
        tree = state if kind == "orbax_train_state" else serialization.to_state_dict(state)
        checkpointer.save(path, tree)
    return path


KINDS = ["state_dict", "msgpack_bytes", "msgpack_file", "orbax_manager", "orbax_train_state"]
KINDS += ["orbax_state_dict"]


@pytest.mark.parametrize("kind", KINDS)
def test_convert_loads_the_model_state_of_a_training_checkpoint(kind, state, tmp_path):
    checkpoint = stored(kind, state, tmp_path)
    template = nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0)))
    model = bridge.convert(checkpoint, to="nnx", template=template)  # strict
    assert_same_arrays(model.layers[0].kernel.get_value(), state.params["layers_0"]["kernel"])
    assert_same_arrays(model.bn.var.get_value(), state.batch_stats["bn"]["var"])
    assert type(model.bn.var) is nnx.BatchStat

    plan = bridge.plan(checkpoint, to="nnx", template=template)
    assert plan.report.ok and not plan.report.unexpected
    [note] = [note for note in plan.report.notes if "TrainState" in note]
    assert "opt_state" in note and "bridge.migrate(..., optimizer=...)" in note
    assert {row.target for row in plan.rows} == {
        "layers.0.kernel",
        "layers.0.bias",
        "layers.1.kernel",
        "layers.1.bias",
        "bn.scale",
        "bn.bias",
        "bn.mean",
        "bn.var",
    }


def test_migrate_still_carries_the_training_state(state, tmp_path):
    checkpoint = stored("orbax_manager", state, tmp_path)
    import optax

    optimizer = nnx.eval_shape(
        lambda: nnx.Optimizer(NnxMlp(nnx.Rngs(0)), optax.adam(1e-2), wrt=nnx.Param)
    )
    _, restored = bridge.migrate(
        checkpoint, model=nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0))), optimizer=optimizer
    )
    assert int(restored.step.get_value()) == int(state.step)
    np.testing.assert_array_equal(
        restored.opt_state[0].nu["layers"][1]["bias"].get_value(),
        state.opt_state[0].nu["layers_1"]["bias"],
    )
