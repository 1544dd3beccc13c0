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
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from bridge.errors import FormatError
from bridge.report import Problem
from bridge.tree import (
    Derived,
    FlatState,
    Leaf,
    Path,
    PathLookup,
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
    "LinearGeneral": "LinearGeneral",
    "DenseGeneral": "LinearGeneral",
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
FLAX_WEIGHT_ROLES = {"Linear": "kernel", "LinearGeneral": "kernel", **WEIGHT_ROLES}
"""The Flax name of a torch `weight` in each Flax module family."""

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
    transpose stays sliceable (`Transposed`), so sharded loads read only their slices.
    `shape` is the rule's own result or a head split of it (`fits`), never another."""
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


def head_split(fine: Shape, coarse: Shape) -> bool:
    """Whether `fine` is the 2-D `coarse` with an axis split into several, as a
    LinearGeneral / DenseGeneral kernel splits (in, out) into (in, heads, dim) or
    (heads, dim, out): the one reshape whose element order is defined."""
    if len(coarse) != 2 or len(fine) <= 2:
        return False
    return any(
        math.prod(fine[:cut]) == coarse[0] and math.prod(fine[cut:]) == coarse[1]
        for cut in range(1, len(fine))
    )


def fits(rule: str, torch_shape: Shape, flax_shape: Shape) -> bool:
    """Whether `rule` lays a torch tensor of `torch_shape` out as `flax_shape`."""
    natural = natural_shape(rule, torch_shape, "flax")
    if tuple(flax_shape) == natural:
        return True
    return rule in ("linear", "identity") and head_split(tuple(flax_shape), natural)


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """What is known of one weight <-> kernel pair: both shapes (None for the side that
    has no template) and the module family on each side (None when unknown)."""

    torch_shape: Shape | None
    flax_shape: Shape | None
    torch_family: str | None
    flax_family: str | None

    @property
    def layouts(self) -> list[str]:
        """The layouts of this pair's rule family, the module's own first."""
        shape = self.torch_shape or self.flax_shape or ()
        if len(shape) <= 1:
            return ["identity"]
        if len(shape) == 2:
            own = KERNEL_RULES.get(self.torch_family or "", "linear")
            return [own, *(rule for rule in ("linear", "identity") if rule != own)]
        own = KERNEL_RULES.get(self.torch_family or "") or KERNEL_RULES.get(self.flax_family or "")
        if own is None and self.flax_family == "LinearGeneral":
            raise Ambiguous(
                f"a LinearGeneral kernel {shape}: without a torch template nothing tells "
                "which of its axes are the inputs; pass the torch module as template"
            )
        if own is None:
            raise Ambiguous(
                "a convolution kernel, but nothing tells Conv from ConvTranspose: pass the "
                "torch module instead of its state_dict, an NNX template, or "
                "modules={pattern: 'Conv'}"
            )
        return [own, "identity"]

    @property
    def determined(self) -> bool:
        """Both modules known: their layouts fix the rule, nothing else may be tried."""
        return self.torch_family in KERNEL_RULES and self.flax_family is not None

    def fitting(self) -> list[str]:
        if self.torch_shape is None or self.flax_shape is None:
            return []
        layouts = self.layouts[:1] if self.determined else self.layouts
        return [rule for rule in layouts if fits(rule, self.torch_shape, self.flax_shape)]


def kernel_layouts(
    torch_shape: Shape, flax_shape: Shape, torch_family: str | None, flax_family: str | None
) -> list[str]:
    """The layouts `convert` may choose between to lay a torch weight out as a Flax kernel
    of `flax_shape` (the modules' own only, when both are known); for a convolution whose
    kind nothing tells, every layout that fits (the conversion then asks which)."""
    try:
        return _Kernel(torch_shape, flax_shape, torch_family, flax_family).fitting()
    except Ambiguous:
        return [rule for rule in RULES if fits(rule, torch_shape, flax_shape)]


class _NoFit(Exception):
    """No layout of the rule family gives the template's shape."""


def _choose(kernel: _Kernel, evidence: Mapping[str | None, set[str]]) -> tuple[str, str]:
    """The layout of one kernel and why, when it is not the module's own.

    The modules decide when both are known. Otherwise the template's shape decides
    when exactly one layout of the family gives it. When several do (a square weight),
    a known torch module decides, unless the other kernels of the same torch family in
    this state all took another layout (the template's convention, e.g. transformers'
    FlaxConv1D stores (out, in)); a weight of unknown module takes the torch convention
    (out, in) unless this state holds weights stored (in, out), when nothing tells.
    """
    layouts = kernel.layouts
    if kernel.torch_shape is None or kernel.flax_shape is None:
        return layouts[0], ""  # one side is free: it takes the module's (or torch's) layout
    fitting = kernel.fitting()
    if not fitting:
        raise _NoFit(layouts[:1] if kernel.determined else layouts)
    if len(fitting) == 1:
        return fitting[0], "" if fitting[0] == layouts[0] else "the template's shape"
    if kernel.torch_family is not None:
        seen = evidence.get(kernel.torch_family, set())
        if len(seen) == 1 and (rule := next(iter(seen))) in fitting:
            why = "" if rule == layouts[0] else f"as the other {kernel.torch_family} kernels"
            return rule, why
        if len(seen) > 1:
            raise Ambiguous(
                f"a square weight, and the other {kernel.torch_family} kernels of this state "
                f"take different layouts ({', '.join(sorted(seen))}): its orientation is "
                "unknown; pass modules={pattern: 'Conv1D' or 'Linear'} for it"
            )
        return layouts[0], ""
    if evidence.get(None, set()) - {"linear"} and len(kernel.torch_shape) == 2:
        raise Ambiguous(
            "a square weight, and this state holds 2-D weights in both layouts (some stored "
            "(in, out) as HF Conv1D does): its orientation is unknown; pass the torch module "
            "instead of its state_dict, or modules={pattern: 'Conv1D' or 'Linear'}"
        )
    return layouts[0], ""


def _evidence(kernels: list[_Kernel]) -> dict[str | None, set[str]]:
    """The layouts that kernels of each torch family took where their shapes leave one:
    what the template does with a family, for the square kernels that shapes cannot
    tell. Kernels whose modules fix the layout say nothing of the template."""
    seen: dict[str | None, set[str]] = {}
    for kernel in kernels:
        if kernel.determined:
            continue
        try:
            fitting = kernel.fitting()
        except Ambiguous:
            continue
        if len(fitting) == 1:
            seen.setdefault(kernel.torch_family, set()).add(fitting[0])
    return seen


# --- a whole state, torch <-> Flax -------------------------------------------------------

MHA_INPUTS = ("query", "key", "value")
MHA_SEPARATE = {f"{p}_proj_weight": name for p, name in zip("qkv", MHA_INPUTS, strict=True)}


def _by_parent(template: FlatState | None) -> PathLookup | None:
    """Template leaves grouped by their parent module (None without a template)."""
    if template is None:
        return None
    groups: dict[Path, dict[str, Leaf]] = {}
    for path, leaf in template.items():
        groups.setdefault(path[:-1], {})[str(path[-1])] = leaf
    return PathLookup(groups)


def module_hints(modules: Mapping[str, str] | None) -> Callable[[Path], str | None]:
    """The caller's `modules={pattern: family}` as a lookup from a module's path: the
    torch module family of keys, over what a torch module says of itself."""
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
    """The Flax name of a torch `weight`: `weight` itself where the template keeps that
    name (transformers' Flax RMSNorm), else from the torch module, else from the
    template's module, else from the shape where it leaves one reading.

    `siblings` are the template's leaves of the same module (None without a template);
    a weight the template has no module for keeps its name, for the matcher to report.
    """
    if siblings and "weight" in siblings:
        return "weight"
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


def _flax_role(role: str, siblings: Mapping[str, Leaf] | None) -> str:
    """The Flax name of a torch parameter other than `weight`: renamed as the table says
    (running_mean -> mean) unless the template keeps the torch name; any other name (a
    buffer called `mean` or `scale`) is kept as it is."""
    if siblings and role in siblings:
        return role
    return TORCH_ROLES.get(role, role)


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One leaf on its way: its new path, its role there (`kernel` gets a layout rule,
    `fused` is laid out already, anything else is taken as it is) and the template's
    leaf for that path, if any."""

    path: Path
    leaf: Leaf
    role: str
    target: Leaf | None


def to_flax(flat: FlatState, ctx: Context) -> FlatState:
    """torch-layout leaves -> Flax-layout leaves (the table read forwards)."""
    hint = module_hints(ctx.options.get("modules"))
    if ctx.options.get("modules"):  # the caller's families over what torch modules say
        flat = {
            path: leaf.replace(module=hint(path[:-1]) or leaf.module) for path, leaf in flat.items()
        }
    groups = _by_parent(ctx.template_flat)

    def siblings_of(parent: Path) -> dict[str, Leaf] | None:
        return None if groups is None else groups.get(parent, {})

    mha = {path[:-1] for path in flat if path[-1] in ("in_proj_weight", *MHA_SEPARATE)}
    planned: list[_Planned] = []
    for path, leaf in flat.items():
        parent, role = path[:-1], str(path[-1])
        if parent[-1:] == ("out_proj",) and parent[:-1] in mha:
            parent = (*parent[:-1], "out")
        try:
            if role == "num_batches_tracked":  # no Flax module keeps it; a Flax state may
                counter = leaf.replace(transient=True)
                planned.append(_Planned(path, counter, "batch_stats", None))
                continue
            if role in ("in_proj_weight", "in_proj_bias"):
                kind = "kernel" if role.endswith("weight") else "bias"
                for index, name in enumerate(MHA_INPUTS):
                    part = leaf.replace(
                        value=split(leaf.value, 3, index),
                        module="Linear",
                        transform=f"split {index + 1}/3",
                    )
                    target = (siblings_of((*parent, name)) or {}).get(kind)
                    planned.append(_Planned((*parent, name, kind), part, kind, target))
                continue
            if role in MHA_SEPARATE:
                parent, role = (*parent, MHA_SEPARATE[role]), "weight"
                leaf = leaf.replace(module="Linear")
            siblings = siblings_of(parent)
            if role == "weight":
                flax_role = _weight_role(leaf, siblings)
                kind = "kernel" if flax_role == "kernel" else "as is"
            else:
                flax_role = _flax_role(role, siblings)
                renamed = flax_role in BATCH_STAT_ROLES and role != flax_role
                kind = "batch_stats" if renamed else "as is"  # a running_mean, not a `mean`
            target = (siblings or {}).get(flax_role)
            planned.append(_Planned((*parent, flax_role), leaf, kind, target))
        except Ambiguous as error:
            ctx.report.ambiguous.append(Problem(leaf.source, found=str(error)))
    return _relaid(planned, ctx, "flax")


_STEP_NAMES = {"linear": "transpose", "conv": "permute", "conv_transpose": "permute+flip"}


def _describe(rule: str, leaf: Leaf, shape: Shape, to: str, why: str = "") -> str:
    """What a plan says was done to a leaf: `"split 1/3, transpose, reshape (4, 2, 2)"`."""
    steps = [leaf.transform] if leaf.transform else []
    if rule in _STEP_NAMES:
        steps.append(_STEP_NAMES[rule] + (f" ({why})" if why else ""))
    elif why:
        steps.append(f"as stored ({why})")
    if tuple(shape) != natural_shape(rule, leaf.shape, to):
        steps.append(f"reshape {tuple(shape)}")
    return ", ".join(steps)


def _torch_role(role: str, leaf: Leaf, siblings: Mapping[str, Leaf] | None) -> str:
    """The torch name of a Flax leaf: the template's where it holds the Flax name itself
    or its table name; without a template, the table's for a leaf of a known Flax module
    family or of a Flax name (kernel, embedding, scale; mean and var of batch_stats);
    any other name is kept."""
    renamed = FLAX_ROLES.get(role, role)
    if siblings:
        return role if role in siblings and renamed not in siblings else renamed
    if role in BATCH_STAT_ROLES:
        return renamed if leaf.kind == "batch_stats" or leaf.module == "BatchNorm" else role
    if leaf.module is not None and role in ("kernel", "embedding", "scale"):
        return renamed if FLAX_WEIGHT_ROLES.get(leaf.module) == role else role
    return renamed


def to_torch(flat: FlatState, ctx: Context) -> FlatState:
    """Flax-layout leaves -> torch-layout leaves (the table read backwards)."""
    hint = module_hints(ctx.options.get("modules"))
    groups = _by_parent(ctx.template_flat)

    def siblings_of(parent: Path) -> dict[str, Leaf] | None:
        return None if groups is None else groups.get(parent, {})

    mha = {
        parent
        for parent, roles in (groups.exact.items() if groups else ())
        if "in_proj_weight" in roles
    }
    fused: dict[tuple[Path, str], dict[str, Leaf]] = {}
    planned: list[_Planned] = []
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
        siblings = siblings_of(parent)
        torch_role = _torch_role(role, leaf, siblings)
        kind = "kernel" if role == "kernel" and torch_role == "weight" else "as is"
        target = (siblings or {}).get(torch_role)
        planned.append(_Planned((*parent, torch_role), leaf, kind, target))

    for (parent, torch_role), parts in fused.items():
        name = "in_proj_weight" if torch_role == "weight" else "in_proj_bias"
        target = (siblings_of(parent) or {}).get(name)
        missing = [p for p in MHA_INPUTS if p not in parts]
        if missing or target is None:
            for part, leaf in parts.items():
                planned.append(_Planned((*parent, part, torch_role), leaf, "kernel", None))
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
        planned.append(_Planned((*parent, name), fused_leaf, "fused", target))
    return _relaid(planned, ctx, "torch", hint)


def _kernel(item: _Planned, to: str, hint: Callable[[Path], str | None]) -> _Kernel:
    """The weight <-> kernel pair of a planned kernel, whichever way it goes; `hint`
    (the caller's `modules=`) names the torch family over what the template says."""
    shape, module = (item.target.shape, item.target.module) if item.target else (None, None)
    if to == "flax":
        return _Kernel(item.leaf.shape, shape, item.leaf.module, module)
    return _Kernel(shape, item.leaf.shape, hint(item.path[:-1]) or module, item.leaf.module)


def _relaid(
    planned: list[_Planned],
    ctx: Context,
    to: str,
    hint: Callable[[Path], str | None] = lambda parent: None,
) -> FlatState:
    """Choose each planned leaf's layout and lay it out towards `to` ("flax" or "torch").

    Kernels first: the layout each takes (see `_choose`), reshaped only by a declared
    head split; then the other leaves, as they are, a bias reshaped only where its
    module's kernel was head-split. A leaf no layout fits keeps its module's layout, and
    its transform names what was tried, for the matcher's report."""
    kernels = {id(item): _kernel(item, to, hint) for item in planned if item.role == "kernel"}
    evidence = _evidence(list(kernels.values()))
    split_modules: set[Path] = set()
    out: FlatState = {}
    sources: dict[Path, str] = {}
    for item in sorted(planned, key=lambda item: item.role != "kernel"):
        leaf, target = item.leaf, item.target
        rule, why = "identity", ""
        shape: Shape = leaf.shape if item.role != "fused" else target.shape  # type: ignore[union-attr]
        if item.role == "kernel":
            kernel = kernels[id(item)]
            try:
                rule, why = _choose(kernel, evidence)
                shape = target.shape if target is not None else natural_shape(rule, leaf.shape, to)
            except Ambiguous as error:
                ctx.report.ambiguous.append(Problem(leaf.source, found=str(error)))
                continue
            except _NoFit as tried:
                rule = tried.args[0][0]
                shape = natural_shape(rule, leaf.shape, to)
                why = "no layout gives the template's shape: " + ", ".join(
                    f"{name} -> {natural_shape(name, leaf.shape, to)}" for name in tried.args[0]
                )
            if tuple(shape) != natural_shape(rule, leaf.shape, to):
                split_modules.add(item.path[:-1])
        elif (
            item.role != "fused"
            and target is not None
            and item.path[:-1] in split_modules
            and _bias_split(leaf.shape, target.shape, to)
        ):
            shape = target.shape
        if item.path in out:
            raise FormatError(
                f"{sources[item.path]!r} and {leaf.source!r} would both become "
                f"{dotted(item.path)!r}; rename one with rules=..."
            )
        sources[item.path] = leaf.source
        value = leaf.value if item.role == "fused" else apply(rule, leaf.value, shape, to)
        out[item.path] = leaf.replace(
            value=value,
            kind="batch_stats" if to == "flax" and item.role == "batch_stats" else None,
            module=None,
            transform=leaf.transform
            if item.role == "fused"
            else _describe(rule, leaf, shape, to, why),
        )
    return {path: out[path] for path in _in_order(planned, out)}


def _bias_split(source: Shape, target: Shape, to: str) -> bool:
    """A bias of a head-split kernel: (out,) <-> (heads, dim)."""
    fine, coarse = (target, source) if to == "flax" else (source, target)
    return len(coarse) == 1 and len(fine) > 1 and math.prod(fine) == coarse[0]


def _in_order(planned: list[_Planned], out: FlatState) -> list[Path]:
    """The output's paths in the source's order (kernels were laid out first)."""
    return [item.path for item in planned if item.path in out]
