"""Tensor layout rules between PyTorch and Flax conventions, each with its inverse.

    PyTorch                               Flax                            rule
    nn.Linear.weight (out, in)            Linear/Dense.kernel (in, out)   linear: transpose
    nn.Linear.weight (out, in)            LinearGeneral.kernel            linear + reshape
    HF Conv1D.weight (in, out)            Linear.kernel (in, out)         identity
    nn.ConvNd.weight (O, I/g, *K)         Conv.kernel (*K, I/g, O)        conv: axes (2..n+1, 1, 0)
    nn.ConvTransposeNd.weight (I, O, *K)  ConvTranspose.kernel (*K, I, O) conv_transpose: axes
                                                                          (2..n+1, 0, 1), K flipped
    nn.Embedding.weight                   Embed.embedding                 identity
    LayerNorm/RMSNorm/GroupNorm.weight    .scale                          identity
    BatchNorm running_mean/var            mean/var (batch_stats)          identity
    MultiheadAttention in_proj_*          query/key/value (heads, dim)    split, linear + reshape

`conv_transpose` matches Flax's `ConvTranspose(transpose_kernel=False)`, its default;
the tests check it numerically against torch. Which rule applies is decided from what is
known: the torch module type, the target's module type and role from the template, and
the shapes of both sides where they admit one reading only. A square matrix whose
orientation nothing tells is refused, never guessed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from bridge.mapping import Problem
from bridge.tree import (
    Derived,
    FlatState,
    Leaf,
    Path,
    Transposed,
    concatenate,
    dotted,
    match_key,
    split,
)

if TYPE_CHECKING:
    from bridge.graph import Context

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LayoutRule:
    """A pair of inverse transforms: `to_flax(torch_array, flax_shape)` and
    `to_torch(flax_array, torch_shape)`. Both are numpy views where numpy allows."""

    name: str
    to_flax: Callable[[np.ndarray, Shape], np.ndarray]
    to_torch: Callable[[np.ndarray, Shape], np.ndarray]


def _conv_axes(ndim: int) -> tuple[int, ...]:
    return (*range(2, ndim), 1, 0)


def _conv_transpose_to_flax(array: np.ndarray, shape: Shape) -> np.ndarray:
    spatial = tuple(range(array.ndim - 2))
    return np.flip(array.transpose(*range(2, array.ndim), 0, 1), spatial).reshape(shape)


def _conv_transpose_to_torch(array: np.ndarray, shape: Shape) -> np.ndarray:
    spatial = tuple(range(array.ndim - 2))
    flipped = np.flip(array, spatial)
    return flipped.transpose(array.ndim - 2, array.ndim - 1, *spatial).reshape(shape)


def _linear_to_torch(array: np.ndarray, shape: Shape) -> np.ndarray:
    out_features, in_features = shape[0], int(np.prod(shape[1:]))
    return array.reshape(in_features, out_features).T.reshape(shape)


RULES: dict[str, LayoutRule] = {
    rule.name: rule
    for rule in (
        LayoutRule("identity", lambda a, s: a.reshape(s), lambda a, s: a.reshape(s)),
        LayoutRule("linear", lambda a, s: a.T.reshape(s), _linear_to_torch),
        LayoutRule(
            "conv",
            lambda a, s: a.transpose(_conv_axes(a.ndim)).reshape(s),
            lambda a, s: a.transpose(np.argsort(_conv_axes(a.ndim))).reshape(s),
        ),
        LayoutRule("conv_transpose", _conv_transpose_to_flax, _conv_transpose_to_torch),
    )
}

# Module families: the torch and Flax classes a rule is chosen by (matched on the MRO,
# so subclasses such as MultiheadAttention's out_proj count as their base).
TORCH_FAMILIES = {
    "Linear": "Linear",
    "Conv1D": "Conv1D",  # transformers.pytorch_utils.Conv1D: weight stored (in, out)
    "Conv1d": "Conv",
    "Conv2d": "Conv",
    "Conv3d": "Conv",
    "ConvTranspose1d": "ConvTranspose",
    "ConvTranspose2d": "ConvTranspose",
    "ConvTranspose3d": "ConvTranspose",
    "Embedding": "Embedding",
    "LayerNorm": "Norm",
    "RMSNorm": "Norm",
    "GroupNorm": "Norm",
    "BatchNorm1d": "BatchNorm",
    "BatchNorm2d": "BatchNorm",
    "BatchNorm3d": "BatchNorm",
    "MultiheadAttention": "MultiheadAttention",
}
FLAX_FAMILIES = {
    "Linear": "Linear",
    "Dense": "Linear",
    "LinearGeneral": "Linear",
    "DenseGeneral": "Linear",
    "Conv": "Conv",
    "ConvTranspose": "ConvTranspose",
    "Embed": "Embedding",
    "LayerNorm": "Norm",
    "RMSNorm": "Norm",
    "GroupNorm": "Norm",
    "BatchNorm": "BatchNorm",
    "MultiHeadAttention": "MultiheadAttention",
    "MultiHeadDotProductAttention": "MultiheadAttention",
}
KERNEL_RULES = {"Linear": "linear", "Conv1D": "identity", "Conv": "conv"}
KERNEL_RULES["ConvTranspose"] = "conv_transpose"
WEIGHT_ROLES = {"Embedding": "embedding", "Norm": "scale", "BatchNorm": "scale"}
WEIGHT_ROLES |= dict.fromkeys(KERNEL_RULES, "kernel")

TORCH_ROLES = {"bias": "bias", "running_mean": "mean", "running_var": "var"}
"""torch parameter names -> Flax names, besides `weight` (whose Flax name depends on
the module: kernel, embedding or scale)."""
FLAX_ROLES = {flax: torch for torch, flax in TORCH_ROLES.items()}
FLAX_ROLES |= dict.fromkeys(("kernel", "embedding", "scale"), "weight")
BATCH_STAT_ROLES = {"mean", "var"}


def family(cls: type, families: dict[str, str]) -> str | None:
    """The family of a module class: its own name's or its nearest known base's."""
    for base in cls.__mro__:
        if base.__name__ in families:
            return families[base.__name__]
    return None


def apply(rule: str, value: Any, shape: Shape, to: str) -> Any:
    """`value` re-laid out by `rule` towards `to` ("flax" or "torch"), lazily. A pure
    transpose stays sliceable (`Transposed`), so sharded loads read only their slices."""
    if rule == "identity" and tuple(np.shape(value)) == tuple(shape):
        return value
    if rule in ("linear", "conv") and tuple(shape) == natural_shape(rule, np.shape(value), to):
        axes = _conv_axes(len(shape)) if rule == "conv" else (1, 0)
        return Transposed(
            value, axes if to == "flax" or rule == "linear" else tuple(np.argsort(axes))
        )
    fn = getattr(RULES[rule], f"to_{to}")
    return Derived((value,), lambda array: fn(array, shape), tuple(shape), value.dtype)


class Ambiguous(Exception):
    """Raised inside rule selection; turned into a report entry with the key."""


def natural_shape(rule: str, shape: Shape, to: str) -> Shape:
    """The shape `rule` gives without a template to reshape to."""
    if rule == "linear":
        return tuple(shape[::-1])
    if rule in ("conv", "conv_transpose"):
        # torch keeps channels first, Flax last; Conv also swaps (out, in) <-> (in, out)
        channels = shape[:2] if to == "flax" else shape[-2:]
        channels = channels[::-1] if rule == "conv" else channels
        if to == "flax":
            return (*shape[2:], *channels)
        return (*channels, *shape[:-2])
    return tuple(shape)


def kernel_rule(
    torch_shape: Shape | None,
    flax_shape: Shape | None,
    torch_family: str | None,
    flax_family: str | None,
    conv1d_seen: bool,
) -> str:
    """The rule between a torch weight and a Flax kernel, from what is known.

    The torch module decides when known. Otherwise a convolution needs the Flax module
    (Conv or ConvTranspose), and a 2-D weight is read from the shapes when they admit
    one orientation only; a square one takes the torch convention (nn.Linear, stored
    (out, in)) unless this state holds weights stored (in, out) as HF's Conv1D does,
    in which case nothing tells them apart and the caller must say.
    """
    if torch_family in KERNEL_RULES:
        return KERNEL_RULES[torch_family]
    shape = torch_shape or flax_shape or ()
    if len(shape) >= 3:
        if flax_family in ("Conv", "ConvTranspose"):
            return KERNEL_RULES[flax_family]
        raise Ambiguous(
            "a convolution kernel, but nothing tells Conv from ConvTranspose: pass the torch "
            "module instead of its state_dict, an NNX template, or modules={pattern: 'Conv'}"
        )
    if torch_shape is None or flax_shape is None:
        return "linear"  # one side is free: it takes the torch convention
    square = len(torch_shape) == 2 and torch_shape[0] == torch_shape[1]
    if len(flax_shape) == 2 and not square:
        return "identity" if tuple(torch_shape) == tuple(flax_shape) else "linear"
    if conv1d_seen:
        what = "square" if square else f"reshaped to {tuple(flax_shape)}"
        raise Ambiguous(
            f"a {what} weight, and this state holds 2-D weights in both layouts (some stored "
            "(in, out) as HF Conv1D does): its orientation is unknown; pass the torch module "
            "instead of its state_dict, or modules={pattern: 'Conv1D' or 'Linear'}"
        )
    return "linear"


# --- a whole state, torch <-> Flax -------------------------------------------------------

MHA_INPUTS = ("query", "key", "value")
MHA_SEPARATE = {f"{p}_proj_weight": name for p, name in zip("qkv", MHA_INPUTS, strict=True)}


def _by_parent(template: FlatState | None) -> dict[str, dict[str, Leaf]]:
    """Template leaves grouped by the match key of their parent module."""
    groups: dict[str, dict[str, Leaf]] = {}
    for path, leaf in (template or {}).items():
        groups.setdefault(match_key(path[:-1]), {})[str(path[-1])] = leaf
    return groups


def _hinter(modules: Mapping[str, str] | None) -> Callable[[Path], str | None]:
    """The caller's `modules={pattern: family}` as a lookup from a module's path: the
    torch module family of keys a bare state_dict cannot tell."""
    compiled = [(re.compile(pattern), name) for pattern, name in (modules or {}).items()]
    unknown = [name for _, name in compiled if name not in WEIGHT_ROLES]
    if unknown:
        raise ValueError(
            f"modules=: unknown module kind(s) {unknown}; known: {sorted(WEIGHT_ROLES)}"
        )
    return lambda parent: next(
        (name for pattern, name in compiled if pattern.search(dotted(parent))), None
    )


def _weight_role(leaf: Leaf, siblings: Mapping[str, Leaf] | None) -> str:
    """kernel, embedding or scale: from the torch module, else from the template.

    `siblings` are the template's leaves of the same module (None without a template);
    a weight the template has no module for keeps its name, for the matcher to report.
    """
    if leaf.module in WEIGHT_ROLES:
        return WEIGHT_ROLES[leaf.module]
    candidates = [role for role in ("kernel", "embedding", "scale") if role in (siblings or {})]
    if len(candidates) == 1:
        return candidates[0]
    if siblings == {}:
        return "weight"
    if len(leaf.shape) == 1:
        return "scale"
    raise Ambiguous(
        "a weight of unknown module: nothing tells kernel from embedding; pass the torch "
        "module, a template, or modules={pattern: 'Linear' or 'Embedding' ...}"
    )


def _conv1d_seen(pairs: list[tuple[Shape, Shape]]) -> bool:
    """Whether some non-square 2-D weight of unknown module is stored (in, out)."""
    return any(len(a) == len(b) == 2 and a[0] != a[1] and tuple(a) == tuple(b) for a, b in pairs)


def to_flax(flat: FlatState, ctx: Context) -> FlatState:
    """torch-layout leaves -> Flax-layout leaves (the table read forwards)."""
    hint = _hinter(ctx.options.get("modules"))
    flat = {
        path: leaf.replace(module=leaf.module or hint(path[:-1])) for path, leaf in flat.items()
    }
    groups = _by_parent(ctx.template_flat)
    mha = {path[:-1] for path in flat if path[-1] in ("in_proj_weight", *MHA_SEPARATE)}
    planned: list[tuple[Path, Leaf, str, Leaf | None]] = []  # (flax path, leaf, role, target)
    for path, leaf in flat.items():
        parent, role = path[:-1], str(path[-1])
        if parent[-1:] == ("out_proj",) and parent[:-1] in mha:
            parent = (*parent[:-1], "out")
        try:
            if role == "num_batches_tracked":
                ctx.report.dropped.append(f"{leaf.source} (BatchNorm step count: Flax keeps none)")
                continue
            if role in ("in_proj_weight", "in_proj_bias"):
                kind = "kernel" if role.endswith("weight") else "bias"
                for index, name in enumerate(MHA_INPUTS):
                    part = leaf.replace(
                        value=split(leaf.value, 3, index),
                        module="Linear",
                        transform=f"split {index + 1}/3",
                    )
                    target = groups.get(match_key((*parent, name)), {}).get(kind)
                    planned.append(((*parent, name, kind), part, kind, target))
                continue
            if role in MHA_SEPARATE:
                parent, role = (*parent, MHA_SEPARATE[role]), "weight"
                leaf = leaf.replace(module="Linear")
            siblings = groups.get(match_key(parent), {} if groups else None)
            flax_role = TORCH_ROLES.get(role, role)
            if role == "weight":
                flax_role = _weight_role(leaf, siblings)
            target = (siblings or {}).get(flax_role)
            planned.append(((*parent, flax_role), leaf, flax_role, target))
        except Ambiguous as error:
            ctx.report.ambiguous.append(Problem(leaf.source, found=str(error)))

    return _relaid(planned, ctx, "flax", lambda parent: None)


_STEP_NAMES = {"linear": "transpose", "conv": "permute", "conv_transpose": "permute+flip"}


def _describe(rule: str, leaf: Leaf, shape: Shape, to: str) -> str:
    """What a plan says was done to a leaf: `"split 1/3, transpose, reshape (4, 2, 2)"`."""
    steps = [leaf.transform] if leaf.transform else []
    if rule in _STEP_NAMES:
        steps.append(_STEP_NAMES[rule])
    if tuple(shape) != natural_shape(rule, leaf.shape, to):
        steps.append(f"reshape {tuple(shape)}")
    return ", ".join(steps)


def to_torch(flat: FlatState, ctx: Context) -> FlatState:
    """Flax-layout leaves -> torch-layout leaves (the table read backwards)."""
    hint = _hinter(ctx.options.get("modules"))
    groups = _by_parent(ctx.template_flat)
    mha = {parent for parent, roles in groups.items() if "in_proj_weight" in roles}
    fused: dict[tuple[Path, str], dict[str, Leaf]] = {}
    planned: list[tuple[Path, Leaf, str, Leaf | None]] = []  # (torch path, leaf, role, target)
    if described := [leaf.source for leaf in flat.values() if leaf.metadata]:
        ctx.report.dropped.append(
            f"Variable metadata (partitioning, ...) of {len(described)} leaves: torch keeps "
            f"none ({', '.join(described[:3])}{', ...' if len(described) > 3 else ''})"
        )
    for path, leaf in flat.items():
        if leaf.transient:  # NNX RNG state: torch has no place for it
            ctx.report.dropped.append(leaf.source)
            continue
        parent, role = path[:-1], str(path[-1])
        torch_role = FLAX_ROLES.get(role, role)
        if parent and str(parent[-1]) in MHA_INPUTS and match_key(parent[:-1]) in mha:
            fused.setdefault((parent[:-1], torch_role), {})[str(parent[-1])] = leaf
            continue
        if parent and parent[-1] == "out" and match_key(parent[:-1]) in mha:
            parent = (*parent[:-1], "out_proj")
        target = groups.get(match_key(parent), {}).get(torch_role)
        planned.append(((*parent, torch_role), leaf, role, target))

    for (parent, torch_role), parts in fused.items():
        name = "in_proj_weight" if torch_role == "weight" else "in_proj_bias"
        target = groups.get(match_key(parent), {}).get(name)
        missing = [p for p in MHA_INPUTS if p not in parts]
        if missing or target is None:
            for part, leaf in parts.items():
                planned.append(((*parent, part, torch_role), leaf, "kernel", None))
            continue
        rule = "linear" if torch_role == "weight" else "identity"
        third = (target.shape[0] // 3, *target.shape[1:])
        pieces = [apply(rule, parts[p].value, third, "torch") for p in MHA_INPUTS]
        steps = [_STEP_NAMES[rule]] if rule in _STEP_NAMES else []
        fused_leaf = parts["query"].replace(
            value=concatenate(pieces),
            source=", ".join(parts[p].source for p in MHA_INPUTS),
            transform=", ".join([*steps, "concatenate 3"]),
        )
        planned.append(((*parent, name), fused_leaf, "fused", target))

    return _relaid(planned, ctx, "torch", hint)


def _relaid(
    planned: list[tuple[Path, Leaf, str, Leaf | None]],
    ctx: Context,
    to: str,
    hint: Callable[[Path], str | None],
) -> FlatState:
    """Choose each planned leaf's rule and lay it out towards `to` ("flax" or "torch").

    `planned` holds (new path, leaf, role, the template's leaf or None); `hint` gives the
    torch module family the caller declared for a path (`modules=`).
    """

    def sides(path: Path, leaf: Leaf, target: Leaf | None) -> tuple[Any, Any, Any, Any]:
        """(torch shape, Flax shape, torch family, Flax family) of a planned leaf."""
        other_shape, other_family = (target.shape, target.module) if target else (None, None)
        if to == "flax":
            return leaf.shape, other_shape, leaf.module, other_family
        return other_shape, leaf.shape, other_family or hint(path[:-1]), leaf.module

    kernels = [sides(*plan[:2], plan[3]) for plan in planned if plan[2] == "kernel" and plan[3]]
    conv1d_seen = _conv1d_seen([(a, b) for a, b, family, _ in kernels if family is None])
    out: FlatState = {}
    for path, leaf, role, target in planned:
        rule = "identity"
        if role == "kernel":
            try:
                rule = kernel_rule(*sides(path, leaf, target), conv1d_seen)
            except Ambiguous as error:
                ctx.report.ambiguous.append(Problem(leaf.source, found=str(error)))
                continue
        shape = target.shape if target is not None else natural_shape(rule, leaf.shape, to)
        if int(np.prod(shape)) != int(np.prod(leaf.shape)):
            shape = natural_shape(rule, leaf.shape, to)  # the matcher reports the mismatch
        out[path] = leaf.replace(
            value=apply(rule, leaf.value, shape, to),
            kind="batch_stats" if to == "flax" and role in BATCH_STAT_ROLES else None,
            module=None,
            transform=_describe(rule, leaf, shape, to),
        )
    return out
