"""Whether a source module fits a template module through the layout step, for
`rules="auto"` (bridge.suggest): which leaf fills which (`weight` -> `kernel`), whether
each would be laid out in the template's shape, and along which axis a fused
projection is its parts. The same rules `convert` applies: a pair the layout step
would refuse is never proposed."""

from __future__ import annotations

import math
from collections.abc import Sequence

from bridge.blocks import Roles, shaped
from bridge.layout import FLAX_ROLES, TORCH_ROLES, WEIGHT_ROLES, kernel_layouts
from bridge.naming import COUNTER
from bridge.tree import Leaf

WEIGHT_NAMES = ("kernel", "embedding", "scale", "weight")
"""The Flax names of a weight (and torch's); the first three say its module's kind."""


def role_map(src: Roles, tgt: Roles, crossing: str | None) -> dict[str, str] | None:
    """Which template leaf each source leaf of a module fills (`weight` -> `kernel`),
    as the layout step names them, or None when the two modules hold different roles.
    `crossing` is "flax" (torch source, Flax template), "torch", or None (same side)."""
    own = [role for role in src if not (role == COUNTER and crossing == "flax")]
    wanted = [role for role in tgt if not (role == COUNTER and crossing == "torch")]
    if len(own) != len(wanted):
        return None
    out: dict[str, str] = {}
    for role in own:
        name: str | None = role if role in tgt else None
        if name is None and crossing == "flax":
            weights = [r for r in wanted if r in WEIGHT_NAMES]
            name = (weights[0] if len(weights) == 1 else None) if role == "weight" else None
            name = name or TORCH_ROLES.get(role)
        elif name is None and crossing == "torch":
            name = FLAX_ROLES.get(role)
        if name is None or name not in tgt:
            return None
        out[role] = name
    return out if len(set(out.values())) == len(out) else None


def leaf_fits(src: Leaf, tgt: Leaf, flax_role: str, crossing: str | None) -> bool:
    """Whether the layout step would lay `src` out as `tgt` (`flax_role` is the Flax
    name of the pair): a kernel by one of its module family's layouts that gives the
    template's shape, any other leaf as it is (a bias also split into heads)."""
    if crossing is None:
        return src.shape == tgt.shape
    torch_leaf, flax_leaf = (src, tgt) if crossing == "flax" else (tgt, src)
    own = WEIGHT_ROLES.get(torch_leaf.module or "")
    if flax_role in WEIGHT_NAMES[:3] and own not in (None, flax_role):
        return False  # the torch module says it is another kind (an Embedding, not a Linear)
    if flax_role == "kernel":
        return bool(
            kernel_layouts(torch_leaf.shape, flax_leaf.shape, torch_leaf.module, flax_leaf.module)
        )
    if torch_leaf.shape == flax_leaf.shape:
        return True
    fine, coarse = flax_leaf.shape, torch_leaf.shape
    return len(coarse) == 1 and len(fine) > 1 and math.prod(fine) == coarse[0]


def compatible(src: Roles, tgt: Roles, crossing: str | None) -> bool:
    roles = role_map(src, tgt, crossing)
    return roles is not None and all(
        leaf_fits(src[a], tgt[b], a if crossing == "torch" else b, crossing)
        for a, b in roles.items()
    )


def fused_axes(
    whole: Roles, parts: Sequence[Roles], crossing: str | None, whole_is_source: bool
) -> dict[str, int] | None:
    """Per source role, the one axis along which `whole` is the concatenation of `parts`
    (source layout); None when no axis gives modules that fit, `ManyAxes` when several
    do."""
    src_roles = whole if whole_is_source else parts[0]
    maps = [
        role_map(whole, part, crossing) if whole_is_source else role_map(part, whole, crossing)
        for part in parts
    ]
    if any(m is None for m in maps):
        return None
    axes: dict[str, int] = {}
    for role in src_roles:
        if role == COUNTER:
            continue
        found = []
        for axis in range(len(src_roles[role].shape)):
            if whole_is_source:
                shape = list(whole[role].shape)
                if shape[axis] % len(parts):
                    continue
                shape[axis] //= len(parts)
                piece = shaped(whole[role], tuple(shape))
                ok = all(
                    leaf_fits(piece, part[m[role]], _flax(role, m[role], crossing), crossing)  # type: ignore[index]
                    for part, m in zip(parts, maps, strict=True)
                )
            else:
                shapes = [part[role].shape for part in parts]
                if any(len(s) != len(shapes[0]) for s in shapes):
                    continue
                rest = {s[:axis] + s[axis + 1 :] for s in shapes}
                if len(rest) != 1:
                    continue
                merged = list(shapes[0])
                merged[axis] = sum(s[axis] for s in shapes)
                target = maps[0][role]  # type: ignore[index]
                ok = leaf_fits(
                    shaped(parts[0][role], tuple(merged)),
                    whole[target],
                    _flax(role, target, crossing),
                    crossing,
                )
            if ok:
                found.append(axis)
        if len(found) > 1:
            raise ManyAxes(role, found)
        if not found:
            return None
        axes[role] = found[0]
    return axes


class ManyAxes(Exception):
    """A fused tensor whose parts fit along more than one axis: a weight of unknown
    module, (out, in) or (in, out)."""


def _flax(src_role: str, tgt_role: str, crossing: str | None) -> str:
    return src_role if crossing == "torch" else tgt_role
