"""Recipe: a port whose names differ from the checkpoint's, loaded through rules
suggested from the structure of both sides; a scanned port exported back; a Linen port
whose blocks Linen named; a tie refused until a hint decides.
docs/recipes/names-differ.md walks through it.

    python examples/names_differ.py
"""

# --8<-- [start:suggest]
import numpy as np
import torch
from flax import nnx

import bridge


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = torch.nn.ModuleDict(
            {
                "q_proj": torch.nn.Linear(8, 8),
                "k_proj": torch.nn.Linear(8, 4),
                "v_proj": torch.nn.Linear(8, 4),
                "o_proj": torch.nn.Linear(8, 8),
            }
        )
        self.input_layernorm = torch.nn.LayerNorm(8)
        self.mlp = torch.nn.ModuleDict(
            {"up_proj": torch.nn.Linear(8, 16), "down_proj": torch.nn.Linear(16, 8)}
        )


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(50, 8)
        self.layers = torch.nn.ModuleList(Block() for _ in range(3))
        self.norm = torch.nn.LayerNorm(8)


class PortBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.Dict(
            wq=nnx.Linear(8, 8, rngs=rngs),
            wk=nnx.Linear(8, 4, rngs=rngs),
            wv=nnx.Linear(8, 4, rngs=rngs),
            wo=nnx.Linear(8, 8, rngs=rngs),
        )
        self.ln1 = nnx.LayerNorm(8, rngs=rngs)
        self.mlp = nnx.Dict(fc1=nnx.Linear(8, 16, rngs=rngs), fc2=nnx.Linear(16, 8, rngs=rngs))


class Port(nnx.Module):
    def __init__(self, rngs):
        self.tok_embeddings = nnx.Embed(50, 8, rngs=rngs)
        self.blocks = nnx.List([PortBlock(rngs) for _ in range(3)])
        self.final_norm = nnx.LayerNorm(8, rngs=rngs)


torch.manual_seed(0)
torch_model = TorchNet()
template = nnx.eval_shape(lambda: Port(nnx.Rngs(0)))

suggestion = bridge.suggest_rules(torch_model, template=template)
print(suggestion.counts())
for pairing in suggestion.pairings[:2]:
    print(pairing)
# --8<-- [end:suggest]

# --8<-- [start:convert]
print(suggestion.rules[0])
model = bridge.convert(torch_model, to="nnx", template=template, rules="auto")
expected = torch_model.layers[2].mlp["down_proj"].weight.detach().numpy().T
assert np.asarray(model.blocks[2].mlp["fc2"].kernel.get_value()).tobytes() == expected.tobytes()
# --8<-- [end:convert]


# --8<-- [start:export]
class ScannedPort(nnx.Module):
    def __init__(self, rngs):
        self.tok_embeddings = nnx.Embed(50, 8, rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):  # three blocks stacked into one, for nnx.scan
            return PortBlock(rngs)

        self.blocks = blocks(rngs)
        self.final_norm = nnx.LayerNorm(8, rngs=rngs)


scanned = ScannedPort(nnx.Rngs(1))
export = bridge.suggest_rules(scanned, template=torch_model)
print(export.rules[0])
print(export.rules[-1])
state = bridge.convert(scanned, to="torch", template=torch_model, rules="auto")
expected = np.asarray(scanned.blocks.attn["wq"].kernel.get_value())[2].T
assert state["layers.2.self_attn.q_proj.weight"].numpy().tobytes() == expected.tobytes()
# --8<-- [end:export]


# --8<-- [start:linen]
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):  # the shapes matter here, not the maths
        x = nn.LayerNorm(name="ln1")(x)
        q, _, _ = (nn.Dense(n, name=f"w{c}")(x) for c, n in zip("qkv", (8, 4, 4), strict=True))
        x = x + nn.Dense(8, name="wo")(q)
        return x + nn.Dense(8, name="fc2")(nn.Dense(16, name="fc1")(x))


class LinenPort(nn.Module):
    def setup(self):
        self.tok_embeddings = nn.Embed(50, 8)
        self.blocks = [LinenBlock() for _ in range(3)]  # Linen names them blocks_0, ...
        self.final_norm = nn.LayerNorm()

    def __call__(self, ids):
        x = self.tok_embeddings(ids)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


variables = LinenPort().init(jax.random.key(0), np.zeros((1, 2), np.int32))
print(bridge.suggest_rules(torch_model, template=variables).pairings[0])
params = bridge.convert(torch_model, to="linen", template=variables, rules="auto")["params"]
expected = torch_model.layers[1].self_attn["q_proj"].weight.detach().numpy().T
assert np.asarray(params["blocks_1"]["wq"]["kernel"]).tobytes() == expected.tobytes()
# --8<-- [end:linen]


# --8<-- [start:tie]
class Twins(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)


class Pair(nnx.Module):
    def __init__(self, rngs):
        self.left, self.right = nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)


twins, pair = Twins(), nnx.eval_shape(lambda: Pair(nnx.Rngs(0)))
print(bridge.suggest_rules(twins, template=pair).ties[0].sources)
try:
    bridge.convert(twins, to="nnx", template=pair, rules="auto")
    raise AssertionError("a tie must be refused")
except bridge.MismatchError as error:
    assert "a, b <-> left, right" in str(error)

hints = [(r"^a\.", "left.")]  # a partial rule: the rest follows
model = bridge.convert(twins, to="nnx", template=pair, rules="auto", hints=hints)
# --8<-- [end:tie]

# --8<-- [start:review]
toml = suggestion.to_toml()  # what `bridge plan ... --suggest-rules rules.toml` writes
print(toml.splitlines()[0])
# --8<-- [end:review]
