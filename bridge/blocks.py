"""Repeated blocks, for `rules="auto"` (bridge.suggest): a block repeated under list
indices (`layers.0`, `h.1`, an `nnx.List`), under Linen's automatic names (`layers_0`,
`Block_1`), or stacked into one scanned block (every leaf with the layers on axis 0);
and the keys and patterns of a block's modules, any layer, for the rules."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import jax

from bridge.naming import COUNTER
from bridge.tree import FlatState, Leaf, Path, index_of, position_key

Roles = dict[str, Leaf]
"""One module's leaves by their last key part (`weight`, `bias`, `kernel`, ...)."""

_LINEN_NAME = re.compile(r"(.+)_(0|[1-9][0-9]*)", re.ASCII)
"""`layers_3`: how Linen names the modules a list or a loop creates."""


def by_module(flat: FlatState) -> dict[Path, Roles]:
    """A state's leaves by module (the path without its last part)."""
    out: dict[Path, Roles] = {}
    for path, leaf in flat.items():
        out.setdefault(path[:-1], {})[str(path[-1])] = leaf
    return out


def shaped(leaf: Leaf, shape: tuple[int, ...]) -> Leaf:
    return leaf.replace(value=jax.ShapeDtypeStruct(shape, leaf.dtype))


def size(roles: Roles) -> int:
    return sum(math.prod(leaf.shape) for role, leaf in roles.items() if role != COUNTER)


@dataclasses.dataclass
class Side:
    """Where one side's modules of a scope live: the root, or a block of a family, any
    layer (`block`), spelled `prefix.{i}` or, Linen's way, `prefix_{i}` (`joined`)."""

    prefix: Path = ()
    block: bool = False
    joined: bool = False

    def _parts(self, layer: str, escape=str) -> list[str]:
        parts = [escape(str(p)) for p in self.prefix]
        if self.block and self.joined:
            parts[-1] += "_" + layer
        elif self.block:
            parts.append(layer)
        return parts

    def key(self, rel: Path) -> str:
        """The dotted key of a module, with `{i}` for the layer (KeyTemplate spelling)."""
        return ".".join([*self._parts("{i}"), *map(str, rel)])

    def module_pattern(self, rel: Path) -> str:
        """A regular expression for the module's dotted key, any layer (`modules=`)."""
        parts = [*self._parts(r"\d+", re.escape), *(re.escape(str(p)) for p in rel)]
        return "^" + r"\.".join(parts) + "$"

    def pattern(self, rel: Path) -> str:
        """A regular expression for the module's leaves, any layer: (layer), role."""
        parts = [*self._parts(r"(\d+)", re.escape), *(re.escape(str(p)) for p in rel)]
        return "^" + r"\.".join(parts) + r"\.([^.]+)$"

    def replacement(self, rel: Path) -> str:
        """The module's leaves in `pattern`'s groups (the layer, then the role)."""
        role = r"\g<2>" if self.block else r"\g<1>"
        return ".".join([*self._parts(r"\g<1>"), *map(str, rel), role])


@dataclasses.dataclass
class Family:
    """Repeated blocks: `prefix.{i}.rel` (or Linen's `prefix_{i}.rel`) for i in
    0..layers-1 with the same modules, or one stacked (scanned) block whose leaves all
    carry the layers on axis 0."""

    prefix: Path
    layers: int
    first: dict[Path, Roles]  # the first block's modules by relative path, one layer's shapes
    members: list[Path]  # every module path of the family
    stacked: bool = False
    joined: bool = False

    def block(self, layer: int) -> Path:
        """The path of one layer's block (of the stacked block, for every layer)."""
        if self.stacked:
            return self.prefix
        if self.joined:
            return (*self.prefix[:-1], f"{self.prefix[-1]}_{layer}")
        return (*self.prefix, layer)

    def side(self) -> Side:
        """Its modules' keys, `{i}` for the layer where layers have keys."""
        return Side(self.prefix, block=not self.stacked, joined=self.joined)

    def size(self) -> int:
        """Elements a layer holds: what no fusion, split or layout changes."""
        return sum(size(roles) for roles in self.first.values())


def _block_of(path: Path) -> tuple[Path, bool, int, int] | None:
    """(family prefix, joined, layer, where the block part is) of a module path: its
    first list index after the root (`layers.3`) or Linen-named layer (`layers_3`)."""
    for at, part in enumerate(path):
        if at and index_of(part) is not None:
            return path[:at], False, index_of(part), at  # type: ignore[return-value]
        named = _LINEN_NAME.fullmatch(part) if isinstance(part, str) else None
        if named:
            return (*path[:at], named.group(1)), True, int(named.group(2)), at
    return None


def indexed_families(by_module: Mapping[Path, Roles]) -> list[Family]:
    """Families of blocks with a key per layer: every layer the same modules and shapes."""
    blocks: dict[tuple[Path, bool], dict[int, dict[Path, Roles]]] = {}
    members: dict[tuple[Path, bool], list[Path]] = {}
    for path, roles in by_module.items():
        found = _block_of(path)
        if found is not None:
            prefix, joined, index, at = found
            blocks.setdefault((prefix, joined), {}).setdefault(index, {})[path[at + 1 :]] = roles
            members.setdefault((prefix, joined), []).append(path)
    out = []
    for (prefix, joined), layers in blocks.items():
        signatures = {
            index: {
                (rel, role, leaf.shape)
                for rel, roles in block.items()
                for role, leaf in roles.items()
            }
            for index, block in layers.items()
        }
        first = signatures.get(0)
        if sorted(layers) != list(range(len(layers))) or any(
            s != first for s in signatures.values()
        ):
            continue  # not one block repeated: its modules are paired one by one
        family = Family(prefix, len(layers), layers[0], members[prefix, joined], joined=joined)
        out.append(family)
    return out


def stacked_families(by_module: Mapping[Path, Roles], counts: set[int]) -> list[Family]:
    """Subtrees whose every leaf has the same leading axis, of a layer count the other
    side repeats a block: candidates for a scanned block (the outermost of each)."""
    leading: dict[Path, set[int | None]] = {}
    for path, roles in by_module.items():
        if any(index_of(part) is not None for part in path):
            continue
        for leaf in roles.values():
            first = leaf.shape[0] if leaf.shape else None
            for end in range(1, len(path) + 1):
                leading.setdefault(path[:end], set()).add(first)
    found = sorted(
        (
            prefix
            for prefix, dims in leading.items()
            if len(dims) == 1 and next(iter(dims)) in counts
        ),
        key=len,
    )
    out: list[Family] = []
    for prefix in found:
        if any(prefix[: len(f.prefix)] == f.prefix for f in out):
            continue
        layers = next(iter(leading[prefix]))
        members = [path for path in by_module if path[: len(prefix)] == prefix]
        first = {
            path[len(prefix) :]: {
                role: shaped(leaf, leaf.shape[1:]) for role, leaf in by_module[path].items()
            }
            for path in members
        }
        out.append(Family(prefix, layers, first, members, stacked=True))  # type: ignore[arg-type]
    return out


def align(
    sources: list[Family], targets: list[Family]
) -> tuple[list[tuple[Family, Family]], list[tuple[Family, list[Family]]]]:
    """Source families paired with template families of as many layers, one side's
    blocks stacked at most, and, where one is, of as many elements a layer: the one of
    the same name, else the only one, else the one with the most leaves per layer."""
    pairs, ties = [], []
    free = list(targets)
    for family in sorted(sources, key=lambda f: -len(f.members)):
        same = [
            t
            for t in free
            if t.layers == family.layers
            and not (t.stacked and family.stacked)
            and (not (t.stacked or family.stacked) or t.size() == family.size())
        ]
        named = [t for t in same if position_key(t.prefix) == position_key(family.prefix)]
        if named:
            same = named
        most = max((len(t.members) for t in same), default=0)
        best = [t for t in same if len(t.members) == most]
        if len(best) == 1:
            pairs.append((family, best[0]))
            free.remove(best[0])
        elif best:
            ties.append((family, best))
    return pairs, ties
