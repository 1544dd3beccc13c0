"""Built-in format adapters; importing this package registers them.

The order matters: an adapter registers edges to formats registered before it.
"""

# isort: off
from bridge.formats import nnx
from bridge.formats import linen
from bridge.formats import msgpack
from bridge.formats import torch
from bridge.formats import safetensors
from bridge.formats import orbax

# isort: on

__all__ = ["linen", "msgpack", "nnx", "orbax", "safetensors", "torch"]
