"""Recipe: a HuggingFace GPT-2 checkpoint (`model.safetensors` in a `save_pretrained`
directory) into a Flax NNX GPT-2, without initialising any weights and without a key
table. docs/recipes/hf-safetensors-to-nnx.md walks through it.

    python examples/hf_safetensors_to_nnx.py

Its files go to a temporary directory, removed at exit.
"""

import os
import tempfile

# --8<-- [start:imports]
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from nnx_gpt2 import CONV1D_MODULES, Gpt2LMHead, tiny_hf_gpt2

import bridge

# --8<-- [end:imports]

scratch = tempfile.TemporaryDirectory(prefix="bridge-recipe-")  # removed at exit
os.chdir(scratch.name)

# --8<-- [start:checkpoint]
hf_model = tiny_hf_gpt2()
config = hf_model.config
ids = np.array([[5, 17, 3, 88, 42, 9, 61]])
with torch.no_grad():
    hf_logits = hf_model(torch.from_numpy(ids)).logits.numpy()

hf_model.save_pretrained("gpt2-tiny")  # model.safetensors + config.json
assert bridge.detect("gpt2-tiny") == "safetensors"
# --8<-- [end:checkpoint]

# --8<-- [start:refused]
template = nnx.eval_shape(lambda: Gpt2LMHead(config, nnx.Rngs(0)))  # shapes only
try:
    bridge.convert("gpt2-tiny", to="nnx", template=template)
    raise AssertionError("the square Conv1D weights must not be guessed")
except bridge.MismatchError as error:
    assert "attn.c_proj.weight" in str(error) and "modules=" in str(error)
# --8<-- [end:refused]

# --8<-- [start:load]
model = bridge.convert("gpt2-tiny", to="nnx", template=template, modules=CONV1D_MODULES)

logits = np.asarray(model(jnp.asarray(ids)))
print("same logits as HF:", np.allclose(logits, hf_logits, rtol=0, atol=1e-5))
# --8<-- [end:load]

# --8<-- [start:plan]
plan = bridge.plan("gpt2-tiny", to="nnx", template=template, modules=CONV1D_MODULES)
for row in plan.rows[:4]:
    print(f"{row.source:34} -> {row.target:34} {row.transform or '(as is)'}")
assert plan.report.ok
# --8<-- [end:plan]
