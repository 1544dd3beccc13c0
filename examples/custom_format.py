"""Recipe: a format of your own, here NumPy `.npz` files holding a state_dict in
PyTorch's layout, registered in a few lines and connected to `torch`, so that it loads
into NNX and Linen through torch's layout rules. docs/recipes/custom-format.md walks
through it.

    python examples/custom_format.py

Its files go to a temporary directory, removed at exit.
"""

import tempfile

# isort: split
# --8<-- [start:register]
import os
from pathlib import Path

import numpy as np
from flax import nnx

import bridge


def detect(obj) -> float:  # 0 = not this format, 1 = certain
    if isinstance(obj, str | os.PathLike) and str(obj).endswith(".npz"):
        return 1.0 if Path(obj).is_file() else 0.0
    return 0.0


def read(obj, ctx) -> bridge.FlatState:
    with np.load(obj) as arrays:
        return {tuple(key.split(".")): bridge.Leaf(arrays[key]) for key in arrays.files}


def write(flat: bridge.FlatState, ctx) -> Path:
    path = Path(ctx.options["path"])
    if path.exists() and not ctx.options.get("overwrite"):
        raise bridge.OutputExistsError(f"{path} exists; pass overwrite=True")
    np.savez(path, **{".".join(map(str, p)): np.asarray(leaf.value) for p, leaf in flat.items()})
    return path


bridge.register_format(
    "npz",
    detect=detect,
    read=read,
    write=write,
    description="a .npz file of arrays in torch layout",
    options={"path", "overwrite"},
)
bridge.register_conversion("npz", "torch", cost=1.0)
bridge.register_conversion("torch", "npz", cost=1.0, needs={"path"})
# --8<-- [end:register]

scratch = tempfile.TemporaryDirectory(prefix="bridge-recipe-")  # removed at exit
os.chdir(scratch.name)

# --8<-- [start:use]
rng = np.random.default_rng(0)
np.savez(
    "weights.npz",
    **{
        "dense.weight": rng.normal(size=(3, 4)).astype(np.float32),  # (out, in)
        "dense.bias": np.zeros(3, np.float32),
    },
)
print(bridge.detect("weights.npz"), [(e.src, e.dst) for e in bridge.route("npz", "nnx")])


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(4, 3, rngs=rngs)


model = bridge.convert("weights.npz", to="nnx", template=nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
print(model.dense.kernel.shape)  # transposed by the torch -> Flax layout rules

path = bridge.save(model, "exported.npz", format="npz")
with np.load(path) as exported, np.load("weights.npz") as original:
    np.testing.assert_array_equal(exported["dense.weight"], original["dense.weight"])
# --8<-- [end:use]
