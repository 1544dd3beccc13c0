"""Built-in format adapters; importing this package registers them."""

from bridge.formats import nnx  # isort: skip  (linen registers edges to nnx_state)
from bridge.formats import linen

__all__ = ["linen", "nnx"]
