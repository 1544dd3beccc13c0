"""Per-leaf cost: bridge walks an NNX template's graph once per conversion (each walk
of a 50,000-leaf graph costs as much as the rest of the conversion)."""

from __future__ import annotations

import numpy as np
from flax import nnx
from flax.nnx import graphlib

import bridge


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(3, 2, rngs=rngs)


class Many(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([Block(rngs) for _ in range(3)])


def test_a_conversion_into_nnx_walks_the_template_once(monkeypatch):
    template = nnx.eval_shape(lambda: Many(nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    state_dict = {}
    for i in range(3):
        state_dict[f"blocks.{i}.lin.weight"] = rng.standard_normal((2, 3), np.float32)
        state_dict[f"blocks.{i}.lin.bias"] = rng.standard_normal((2,), np.float32)
    walks = []
    flatten = graphlib.flatten
    monkeypatch.setattr(graphlib, "flatten", lambda *a, **k: walks.append(a) or flatten(*a, **k))

    model = bridge.convert(state_dict, to="nnx", template=template, progress=False)

    assert len(walks) == 1
    for i in range(3):
        kernel = np.asarray(model.blocks[i].lin.kernel.get_value())
        assert kernel.tobytes() == state_dict[f"blocks.{i}.lin.weight"].T.tobytes()
