"""End to end, printing each plan and checking every output:

1. an NNX model with BatchNorm and partitioned kernels -> Linen -> NNX;
2. a transformers GPT-2 saved as safetensors -> NNX (logits compared with torch) ->
   exported back to safetensors -> reloaded by transformers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally
import transformers
from flax import nnx
from nnx_gpt2 import CONV1D_MODULES, Gpt2LMHead, tiny_hf_gpt2

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


def nnx_linen_round_trip() -> None:
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
        raise SystemExit("NNX -> Linen -> NNX: outputs differ")


def gpt2_round_trip(workdir: Path) -> None:
    hf_model = tiny_hf_gpt2()
    config = hf_model.config
    hf_model.save_pretrained(workdir / "hf")  # model.safetensors + config.json
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()

    template = nnx.eval_shape(lambda: Gpt2LMHead(config, nnx.Rngs(0)))
    print(bridge.plan(workdir / "hf", to="nnx", template=template, modules=CONV1D_MODULES), "\n")
    model = bridge.convert(workdir / "hf", to="nnx", template=template, modules=CONV1D_MODULES)
    error = float(np.abs(np.asarray(model(jnp.asarray(ids))) - expected).max())
    print(f"GPT-2 safetensors -> NNX: max |logits - torch logits| = {error:.2e}")

    exported = bridge.save(model, workdir / "export", format="safetensors", modules=CONV1D_MODULES)
    config.save_pretrained(exported)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    with torch.no_grad():
        same = np.array_equal(reloaded(torch.from_numpy(ids)).logits.numpy(), expected)
    print(f"NNX -> safetensors -> transformers.from_pretrained: logits identical: {same}")
    if error > 1e-5 or not same:
        raise SystemExit("GPT-2 round trip: outputs differ")


def main() -> None:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    jnp.zeros(())  # initialise JAX before the prints
    nnx_linen_round_trip()
    print()
    with tempfile.TemporaryDirectory() as workdir:
        gpt2_round_trip(Path(workdir))
    print("demo passed")


if __name__ == "__main__":
    main()
