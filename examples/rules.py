"""Recipe: renaming and restructuring rules for checkpoints whose names or structure
differ from the model's: regex renames, a fused projection split into three, and
per-layer weights stacked for a scanned model, each way back too.
docs/recipes/rules.md walks through it.

    python examples/rules.py
"""

# --8<-- [start:renames]
import numpy as np
import torch
from flax import nnx

import bridge

state = {"a.weight": np.ones(3, np.float32), "b.weight": np.zeros(3, np.float32)}
out = bridge.convert(state, to="nnx_state", rules=[(r"^a\.", "x."), (r"^x\.", "y.")])
print(sorted(out))  # in order: a -> x, then x -> y

try:  # two sources renamed onto one key are refused, never overwritten
    bridge.convert(state, to="nnx_state", rules=[(r"^[ab]\.", "c.")])
    raise AssertionError("a collision must be refused")
except bridge.FormatError as error:
    assert "both 'a.weight' and 'b.weight'" in str(error)
# --8<-- [end:renames]


# --8<-- [start:split]
class TorchFused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)


class NnxSeparate(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q = nnx.Linear(4, 4, rngs=rngs)
        self.k = nnx.Linear(4, 4, rngs=rngs)
        self.v = nnx.Linear(4, 4, rngs=rngs)


torch.manual_seed(0)
fused = TorchFused()
template = nnx.eval_shape(lambda: NnxSeparate(nnx.Rngs(0)))
SPLIT_QKV = bridge.Split("qkv.{r}", ["q.{r}", "k.{r}", "v.{r}"], axis=0)  # torch (out, in)

model = bridge.convert(fused, to="nnx", template=template, rules=[SPLIT_QKV])
plan = bridge.plan(fused, to="nnx", template=template, rules=[SPLIT_QKV])
row = {row.target: row for row in plan.rows}["k.kernel"]
print(row.source, "->", row.target, ":", row.transform)

# back to torch: Flax kernels are (in, out), so the fused axis is the last one there
back = bridge.convert(model, to="torch", template=fused, rules=[SPLIT_QKV.inverse(axis=-1)])
assert torch.equal(back["qkv.weight"], fused.qkv.weight.detach())
# --8<-- [end:split]


# --8<-- [start:stack]
class TorchLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))


class NnxScanned(nnx.Module):
    """Three Linear layers as one, with stacked (3, in, out) parameters for nnx.scan."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return nnx.Linear(4, 4, rngs=rngs)

        self.layers = create(rngs)


torch_model = TorchLayers()
template = nnx.eval_shape(lambda: NnxScanned(nnx.Rngs(0)))
STACK = bridge.Stack("layers.{i}.{rest*}", "layers.{rest*}", over="i")

model = bridge.convert(torch_model, to="nnx", template=template, rules=[STACK])
print(model.layers.kernel.shape)
np.testing.assert_array_equal(
    model.layers.kernel.get_value()[1], torch_model.layers[1].weight.detach().numpy().T
)

back = bridge.convert(model, to="torch", template=torch_model, rules=[STACK.inverse()])
for key, tensor in torch_model.state_dict().items():
    assert torch.equal(back[key], tensor), key
# --8<-- [end:stack]
