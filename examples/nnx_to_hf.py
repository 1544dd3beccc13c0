"""Recipe: export an NNX GPT-2 to a PyTorch state_dict and to safetensors files that
`transformers`' `from_pretrained` loads. docs/recipes/nnx-to-hf.md walks through it.

    python examples/nnx_to_hf.py

Its files go to a temporary directory, removed at exit.
"""

import os
import tempfile

# --8<-- [start:imports]
import jax.numpy as jnp
import numpy as np
import safetensors.torch
import torch
import transformers
from flax import nnx
from nnx_gpt2 import Gpt2LMHead, tiny_hf_gpt2

import bridge

# --8<-- [end:imports]

scratch = tempfile.TemporaryDirectory(prefix="bridge-recipe-")  # removed at exit
os.chdir(scratch.name)

# --8<-- [start:model]
hf_model = tiny_hf_gpt2()
config = hf_model.config
template = nnx.eval_shape(lambda: Gpt2LMHead(config, nnx.Rngs(0)))
model = bridge.convert(hf_model, to="nnx", template=template)  # e.g. after training in JAX

ids = np.array([[5, 17, 3, 88, 42, 9, 61]])
logits = np.asarray(model(jnp.asarray(ids)))
# --8<-- [end:model]

# --8<-- [start:state-dict]
state_dict = bridge.convert(model, to="torch", template=hf_model)
fresh = transformers.GPT2LMHeadModel(config)
fresh.load_state_dict(state_dict, strict=True)  # every key, every shape
assert state_dict["lm_head.weight"] is state_dict["transformer.wte.weight"]  # still tied
for key, tensor in hf_model.state_dict().items():
    assert torch.equal(state_dict[key], tensor), key  # bit-exact round trip
# --8<-- [end:state-dict]

# --8<-- [start:safetensors]
with torch.device("meta"):
    meta_model = transformers.GPT2LMHeadModel(config)

out = bridge.save(model, "gpt2-export", format="safetensors", template=meta_model)
print(sorted(path.name for path in out.iterdir()))

reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
with torch.no_grad():
    hf_logits = reloaded(torch.from_numpy(ids)).logits.numpy()
print("from_pretrained gives the NNX logits:", np.allclose(hf_logits, logits, rtol=0, atol=1e-5))
# --8<-- [end:safetensors]

# --8<-- [start:hub-layout]
hf_model.save_pretrained("gpt2-reference")
ours, theirs = (
    safetensors.torch.load_file(f"{d}/model.safetensors") for d in ("gpt2-export", "gpt2-reference")
)
print(len(ours), "tensors, as save_pretrained writes:", ours.keys() == theirs.keys())
print("bit for bit:", all(torch.equal(ours[key], theirs[key]) for key in theirs))
# --8<-- [end:hub-layout]

# --8<-- [start:overwrite]
try:
    bridge.save(model, "gpt2-export", format="safetensors", template=meta_model)
    raise AssertionError("an existing output must not be replaced silently")
except bridge.OutputExistsError as error:
    print(error)
bridge.save(model, "gpt2-export", format="safetensors", template=meta_model, overwrite=True)
print(sorted(path.name for path in out.iterdir()))
# --8<-- [end:overwrite]
