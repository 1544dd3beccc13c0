"""PyTorch: a state_dict (torch tensors, or numpy arrays in PyTorch layout so that users
without torch can convert an `.npz`), an `nn.Module` (its state_dict plus the family of
the module owning each tensor), or a `.pt` / `.bin` / `.pth` file.

torch is imported only when a torch object or file is met: routes that pass through
this format without reading or writing it (safetensors -> nnx) work without torch.
Files load with `torch.load(weights_only=True)`: a pickle that needs arbitrary code is
refused, never executed.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path as FilePath
from typing import Any

import jax
import ml_dtypes
import numpy as np

from bridge import multihost
from bridge.atomic import atomic_output
from bridge.errors import FormatError
from bridge.graph import Checkpoint, Context, register_conversion, register_format
from bridge.layout import TORCH_FAMILIES, family, to_flax, to_torch
from bridge.progress import track
from bridge.tree import (
    FlatState,
    LazyArray,
    Leaf,
    dotted,
    native_numbers,
    parse_dotted,
    parse_dotted_keys,
)

SUFFIXES = (".pt", ".bin", ".pth")
TORCH_ROLES = frozenset(
    {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "in_proj_weight"}
    | {"in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
)
# torch dtypes numpy lacks, viewed through an integer of the same width
_VIEWS = {
    "bfloat16": ("int16", ml_dtypes.bfloat16),
    "float8_e4m3fn": ("uint8", ml_dtypes.float8_e4m3fn),
    "float8_e5m2": ("uint8", ml_dtypes.float8_e5m2),
}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise FormatError(
            "this needs PyTorch, which is not installed: pip install 'state-bridge[torch]'"
        ) from None
    return torch


def _is_module(obj: Any) -> bool:
    """Without importing torch: an object can't be a torch module unless torch is loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def to_numpy(tensor: Any) -> np.ndarray | jax.ShapeDtypeStruct:
    """A tensor as a numpy array sharing its memory (bf16 and fp8 included); a tensor on
    the meta device (a template built without weights) as a placeholder."""
    tensor = tensor.detach()
    dtype = str(tensor.dtype).removeprefix("torch.")
    integer, ml_dtype = _VIEWS.get(dtype, (None, None))
    if tensor.is_meta:
        return jax.ShapeDtypeStruct(tuple(tensor.shape), ml_dtype or np.dtype(dtype))
    tensor = tensor.cpu()
    if integer is not None:
        return tensor.view(getattr(_torch(), integer)).numpy().view(ml_dtype)
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> Any:
    """A numpy array as a tensor; copied only when numpy's memory is read-only."""
    torch = _torch()
    if not (array.flags.c_contiguous and array.flags.writeable):
        array = array.copy(order="C")  # (np.ascontiguousarray would make scalars 1-D)
    for dtype, (integer, ml_dtype) in _VIEWS.items():
        if array.dtype == ml_dtype:
            return torch.from_numpy(array.view(integer)).view(getattr(torch, dtype))
    return torch.from_numpy(array)


bytes_read = 0
"""Bytes this process has taken out of `.pt` files (the sizes of the slices
`FileTensor.view` selected): how tests and benchmarks see that a sharded load, on one
host or many, reads only the slices its devices hold."""


class FileTensor(LazyArray):
    """A tensor of a `.pt` file as `torch.load(mmap=True)` maps it: a slice is taken out
    of the map only when asked (a sharded load asks for a device's slice), and counted."""

    def __init__(self, mapped: np.ndarray) -> None:
        self.mapped = mapped
        self.shape = mapped.shape
        self.dtype = mapped.dtype

    def view(self, index: Any = ...) -> np.ndarray:
        global bytes_read
        selected = self.mapped[index]
        bytes_read += selected.nbytes
        return selected

    def read(self, index: Any = ...) -> np.ndarray:
        return np.array(self.view(index))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """The map itself, as before it was wrapped: a state_dict made of the file shares
        torch's private (copy-on-write) map instead of copying it."""
        array = self.view()
        if dtype is not None:
            return array.astype(dtype, copy=bool(copy))
        return array.copy() if copy else array


def _load_file(path: FilePath) -> Mapping[str, Any]:
    torch = _torch()
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise FormatError(
            f"{path}: refused: unpickling it would run code beyond tensors ({error}); bridge "
            "never executes pickled code. If you trust the file, load it yourself with "
            "torch.load(weights_only=False) and pass the state_dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise FormatError(f"{path}: not a readable torch file: {error}") from None
    if not isinstance(state, Mapping) or not all(_is_tensor(v) for v in state.values()):
        keys = list(state)[:8] if isinstance(state, Mapping) else type(state).__name__
        raise FormatError(
            f"{path}: holds {keys}, not a state_dict of tensors; load it and pass the "
            "state_dict inside"
        )
    return state


def _storage_key(value: Any) -> tuple[Any, ...]:
    """Identity of a tensor's memory: equal for tied weights."""
    if isinstance(value, np.ndarray):
        address = value.__array_interface__["data"][0]
        return (address, value.shape, value.strides, str(value.dtype))
    return (value.data_ptr(), tuple(value.shape), value.stride(), str(value.dtype))


def _ties(state: Mapping[str, Any], module: Any) -> dict[str, str]:
    """`{key: first key holding the same tensor}` for tied weights. A module says it
    exactly (one Parameter under two names, meta tensors too); a bare state_dict by
    the memory its tensors share."""
    if module is not None:
        named = [*module.named_parameters(remove_duplicate=False)]
        named += [*module.named_buffers(remove_duplicate=False)]
        owners = {key: id(tensor) for key, tensor in named}
        identities = {key: owners.get(key, key) for key in state}
    else:
        identities = {key: _storage_key(value) for key, value in state.items()}
    first: dict[Any, str] = {}
    return {key: first.setdefault(identities[key], key) for key in state}


def read(obj: Any, ctx: Context) -> FlatState:
    families: dict[str, str | None] = {}
    module = obj if _is_module(obj) else None
    where = "the state_dict"
    from_file = isinstance(obj, str | os.PathLike)
    if from_file:
        where = os.fspath(obj)
        state = _load_file(FilePath(obj))
    elif module is not None:
        state = module.state_dict(keep_vars=True)
        families = {name: family(type(m), TORCH_FAMILIES) for name, m in obj.named_modules()}
    else:
        state = obj
    if odd := [key for key in state if not isinstance(key, str)]:
        raise FormatError(
            f"{where}: key {odd[0]!r} is of type {type(odd[0]).__name__}; a state_dict's keys "
            "are dotted strings ('layers.0.weight')"
        )
    ties = _ties(state, module)
    flat: FlatState = {}
    for path, (key, value) in zip(parse_dotted_keys(state), state.items(), strict=True):
        array = value if isinstance(value, np.ndarray) else to_numpy(value)
        flat[path] = Leaf(
            FileTensor(array) if from_file else array,
            module=families.get(key.rpartition(".")[0]),
            transient=path[-1] == "num_batches_tracked",
            alias_of=parse_dotted(ties[key]) if ties[key] != key else None,
        )
    return flat


def write(flat: FlatState, ctx: Context) -> dict[str, Any] | FilePath:
    """A state_dict; with `path=`, that state_dict saved there by `torch.save` (atomic;
    an existing file is replaced only with `overwrite=True`). Under `jax.distributed`
    process 0 saves, gathering the arrays that span processes one at a time; `torch.save`
    pickles the whole state_dict, so process 0 holds the model once."""
    if ctx.options.get("path") is None:
        return _state_dict(flat, ctx)
    target = FilePath(os.fspath(ctx.options["path"]))
    if target.suffix not in SUFFIXES:
        raise FormatError(f"{target}: a torch file is named {'/'.join(SUFFIXES)}")

    def save() -> FilePath:
        with atomic_output(target, overwrite=bool(ctx.options.get("overwrite"))) as temp:
            _torch().save(_state_dict(flat, ctx), temp)
        return target.absolute()

    return multihost.written_by_primary(save, target.absolute())


def _state_dict(flat: FlatState, ctx: Context) -> dict[str, Any]:
    """Leaves that share one array (tied weights) share one tensor."""
    tensors: dict[int, Any] = {}
    state = {}
    sources: dict[str, str] = {}
    subject = ctx.report.subject or "torch"
    for path, leaf in track(flat, ctx, "converting"):
        key = dotted(path)
        if key in sources:
            raise FormatError(
                f"{sources[key]!r} and {leaf.source!r} are both spelled {key!r} in a "
                "state_dict; rename one with rules=..."
            )
        sources[key] = leaf.source
        if id(leaf.value) not in tensors:
            tensors[id(leaf.value)] = from_numpy(_array(f"{subject}: {key!r}", leaf))
        state[key] = tensors[id(leaf.value)]
    return state


def _array(where: str, leaf: Leaf) -> np.ndarray:
    """A leaf's data; a placeholder that a format re-creates (a BatchNorm step count of a
    meta-device template, which no Flax module keeps) as a fresh module has it: zeros."""
    if leaf.is_abstract and leaf.transient:
        return np.zeros(leaf.shape, leaf.dtype)
    if leaf.is_abstract:
        raise FormatError(f"{where} is abstract ({leaf.value}); it has no data to write")
    return native_numbers(leaf.value, where)


def checkpoint(obj: Any) -> Checkpoint | None:
    """The layout of a transformers model's files (bridge.hub), for a template or a source
    that is one; None for any other object. transformers is never imported here."""
    if "transformers" not in sys.modules or not _is_module(obj):
        return None
    from bridge import hub

    return hub.checkpoint(obj)


def detect(obj: Any) -> float:
    if isinstance(obj, str | os.PathLike):
        path = FilePath(obj)
        return 1.0 if path.suffix in SUFFIXES and path.is_file() else 0.0
    if _is_module(obj):
        return 1.0
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return 0.0
    if all(_is_tensor(v) for v in obj.values()):
        return 1.0
    torch_named = all(key.rpartition(".")[2] in TORCH_ROLES for key in obj)
    return 0.6 if torch_named and all(isinstance(v, np.ndarray) for v in obj.values()) else 0.0


register_format(
    "torch",
    detect=detect,
    read=read,
    write=write,
    description="a torch state_dict (or numpy arrays in torch layout), an nn.Module, "
    "or a .pt/.bin/.pth file",
    options={"modules", "path", "overwrite"},
    read_options={"modules"},
    checkpoint=checkpoint,
)
register_conversion("torch", "nnx_state", cost=1.0, transform=to_flax)
register_conversion("torch", "linen", cost=1.0, transform=to_flax)
METADATA = "Variable metadata (partitioning)"
register_conversion("linen", "torch", cost=1.0, transform=to_torch, lossy=True, loses=METADATA)
register_conversion(
    "nnx_state",
    "torch",
    cost=1.0,
    transform=to_torch,
    lossy=True,
    loses=f"NNX RNG state, {METADATA}",
)
