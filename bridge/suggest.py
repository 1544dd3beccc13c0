"""Rules proposed from the structure of both sides, when source and template names differ
(`rules="auto"`, `bridge.suggest_rules`).

Modules (the leaves under one parent path) are paired, never single leaves, by the
strongest evidence that tells a module from its siblings, in this order:

1. the same name, in any spelling (`tree.match_key`, `tree.position_key`), or a hint;
2. the module tree (`bridge.blocks`): repeated blocks (`layers.{i}`, Linen's `layers_{i}`)
   aligned with repeated or stacked (scanned) blocks of as many layers, layer i with
   layer i; blocks are matched once, on their first layer, and the pairing holds for
   every layer. A stacked side is stacked after the renames (`Stack`, loads) or
   renamed in stacked names, then unstacked (`Unstack`, exports);
3. roles spelled by name fragments (`bridge.naming`: q/k/v/o, gate/up/down, fc1/fc2,
   norms, embeddings);
4. shapes after the layout rule (`layout.kernel_layouts`): a pair where each is the
   other's only partner that fits;
5. definition order, between otherwise identical siblings whose names number them on
   both sides (`conv2, conv3` with `convs[1], convs[2]`).

A fused projection (`c_attn`, `qkv`, `gate_up`) is split into, or merged from, the
modules whose names spell its parts, in the order its name spells them. What remains
equally good is a tie: named, and left for a hint, never decided.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

from bridge.blocks import (
    Family,
    Roles,
    Side,
    align,
    by_module,
    indexed_families,
    shaped,
    stacked_families,
)
from bridge.fitting import ManyAxes, compatible, fused_axes, role_map
from bridge.layout import WEIGHT_ROLES, kernel_layouts, module_hints
from bridge.mapping import Merge, Rule, Split, Stack, Unstack, apply_rules
from bridge.naming import COUNTER, FUSED, tag
from bridge.report import Problem, Report
from bridge.rules_file import format_rules, in_file_order
from bridge.tree import FlatState, Leaf, Path, dotted, parse_dotted, position_key

CONFIDENCE = {
    "hint": "given",
    "name": "certain",
    "role": "high",
    "fused": "high",
    "shape": "high",
    "order": "medium",
    "tree": "certain",
}
"""How sure each kind of evidence makes a pairing."""


def _sizes(roles: Roles) -> tuple[int, ...]:
    """What no layout changes: the sizes of a module's leaves (a bucket of candidates)."""
    return tuple(sorted(math.prod(leaf.shape) for role, leaf in roles.items() if role != COUNTER))


# --- pairing modules within one scope --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Pair:
    sources: tuple[Path, ...]
    targets: tuple[Path, ...]
    evidence: str
    axes: Mapping[str, int] | None = None  # Split / Merge: per source role


@dataclasses.dataclass
class _Scope:
    """Modules to pair: each side's by path relative to the scope (a block, or the root)."""

    sources: dict[Path, Roles]
    targets: dict[Path, Roles]
    crossing: str | None
    hinted: set[Path] = dataclasses.field(default_factory=set)
    given: set[Path] = dataclasses.field(default_factory=set)
    """Source modules whose family the caller's `modules=` patterns gave."""
    pairs: list[_Pair] = dataclasses.field(default_factory=list)
    ties: list[tuple[list[Path], list[Path], str]] = dataclasses.field(default_factory=list)
    refused: list[tuple[Path, Path, str]] = dataclasses.field(default_factory=list)
    """Modules that names pair but that do not fit: left for the matcher to report."""

    def __post_init__(self) -> None:
        self.done, self.done_targets = dict(self.sources), dict(self.targets)

    def take(self, sources: Iterable[Path], targets: Iterable[Path], evidence: str, **kw) -> None:
        sources, targets = tuple(sources), tuple(targets)
        for path in sources:
            del self.sources[path]
        for path in targets:
            del self.targets[path]
        self.pairs.append(_Pair(sources, targets, evidence, **kw))

    def tie(self, sources: Sequence[Path], targets: Sequence[Path], reason: str = "") -> None:
        """Set modules aside as a tie: no later step may pair them otherwise."""
        for path in sources:
            del self.sources[path]
        for path in targets:
            del self.targets[path]
        self.ties.append((list(sources), list(targets), reason))

    def fits(self, src: Path, tgt: Path) -> bool:
        return compatible(self.sources[src], self.targets[tgt], self.crossing)

    def pair_or_refuse(self, src: Path, tgt: Path, evidence: str) -> None:
        """Pair what names pair, if it fits; if not, neither is paired elsewhere: weaker
        evidence never overrides names that say these two are one."""
        if self.fits(src, tgt):
            self.take([src], [tgt], evidence)
            return
        del self.sources[src], self.targets[tgt]
        self.refused.append((src, tgt, evidence))

    def by_name(self) -> bool:
        keys = {position_key(path): path for path in self.targets}
        found = [
            (src, keys[position_key(src)]) for src in self.sources if position_key(src) in keys
        ]
        for src, tgt in found:
            self.pair_or_refuse(src, tgt, "hint" if src in self.hinted else "name")
        return bool(found)

    def by_role(self) -> bool:
        progress = False
        sides = [_tagged(self.sources), _tagged(self.targets)]
        for role, sources in sides[0].items():
            targets = sides[1].get(role, [])
            if len(sources) == 1 and len(targets) == 1:
                self.pair_or_refuse(sources[0], targets[0], "role")
                progress = True
        return progress

    def by_fusion(self) -> bool:
        progress = False
        for whole_is_source in (True, False):
            wholes, pieces = (
                (self.sources, self.targets) if whole_is_source else (self.targets, self.sources)
            )
            tagged = _tagged(pieces)
            for path in list(wholes):
                names = FUSED.get(tag(path) or "")
                found = [tagged.get(name, []) for name in names or ()]
                if not names or any(len(paths) != 1 for paths in found):
                    continue
                parts = [paths[0] for paths in found]
                sides = ([path], parts) if whole_is_source else (parts, [path])
                try:
                    axes = fused_axes(
                        wholes[path], [pieces[p] for p in parts], self.crossing, whole_is_source
                    )
                except ManyAxes as many:
                    role, axes_found = many.args
                    self.tie(
                        *sides,
                        f"the {role} of a module nothing names the kind of fits fused along "
                        f"axes {axes_found} ((out, in) or (in, out)); pass "
                        "modules={pattern: 'Linear' or 'Conv1D'} for the source",
                    )
                    tagged = _tagged(pieces)
                    continue
                if axes is None:
                    continue
                if whole_is_source:
                    self.take([path], parts, "fused", axes=axes)
                else:
                    self.take(parts, [path], "fused", axes=axes)
                tagged = _tagged(pieces)
                progress = True
        return progress

    def _candidates(self) -> tuple[dict[Path, list[Path]], dict[Path, list[Path]]]:
        buckets: dict[tuple[int, ...], list[Path]] = {}
        for tgt, roles in self.targets.items():
            buckets.setdefault(_sizes(roles), []).append(tgt)
        forward: dict[Path, list[Path]] = {}
        backward: dict[Path, list[Path]] = {}
        for src, roles in self.sources.items():
            forward[src] = [t for t in buckets.get(_sizes(roles), []) if self.fits(src, t)]
            for tgt in forward[src]:
                backward.setdefault(tgt, []).append(src)
        return forward, backward

    def by_shape(self) -> bool:
        forward, backward = self._candidates()
        found = [
            (src, tgts[0])
            for src, tgts in forward.items()
            if len(tgts) == 1 and len(backward[tgts[0]]) == 1
        ]
        for src, tgt in found:
            self.take([src], [tgt], "shape")
        return bool(found)

    def by_order(self) -> None:
        """The last step: groups of interchangeable siblings, paired in the order their
        names number them on both sides, or else left as ties."""
        forward, backward = self._candidates()
        for sources, targets in _components(forward, backward):
            complete = len(sources) == len(targets) and all(
                set(forward[src]) == set(targets) for src in sources
            )
            order = complete and _numbered(sources) and _numbered(targets)
            if order:
                for src, tgt in zip(_by_number(sources), _by_number(targets), strict=True):
                    self.take([src], [tgt], "order")
            else:
                self.ties.append((sources, targets, ""))

    def run(self) -> None:
        while self.sources and self.targets:
            if not (self.by_name() or self.by_role() or self.by_fusion() or self.by_shape()):
                break
        if self.sources and self.targets:
            self.by_order()


def _tagged(modules: Iterable[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in modules:
        if (role := tag(path)) is not None:
            out.setdefault(role, []).append(path)
    return out


def _components(
    forward: Mapping[Path, list[Path]], backward: Mapping[Path, list[Path]]
) -> list[tuple[list[Path], list[Path]]]:
    """The connected groups of the fits-graph that still have a choice in them."""
    seen: set[tuple[str, Path]] = set()
    out = []
    for start, tgts in forward.items():
        if not tgts or ("s", start) in seen:
            continue
        sources, targets, todo = [], [], [("s", start)]
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            side, path = node
            (sources if side == "s" else targets).append(path)
            nxt = forward[path] if side == "s" else backward.get(path, [])
            todo.extend(("t" if side == "s" else "s", p) for p in nxt)
        out.append((sources, targets))
    return out


def _numbered(paths: Sequence[Path]) -> bool:
    """Whether names number these siblings: one stem, distinct numbers (`conv2`, `conv3`)."""
    stems = {re.sub(r"\d+", "#", dotted(path)) for path in paths}
    numbers = {_number(path) for path in paths}
    return len(stems) == 1 and len(numbers) == len(paths) and () not in numbers


def _number(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", dotted(path)))


def _by_number(paths: Sequence[Path]) -> list[Path]:
    return sorted(paths, key=_number)


# --- the result ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Source modules paired with template modules, and why. A block pairing names the
    modules of every layer with `{i}`: its evidence paired the first layer's `leaves`,
    the module tree the other layers'."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    evidence: str
    leaves: int
    layers: int = 1

    @property
    def confidence(self) -> str:
        return CONFIDENCE[self.evidence]

    def __str__(self) -> str:
        layers = f", x{self.layers} layers by the tree" if self.layers > 1 else ""
        return (
            f"{' + '.join(self.sources)} -> {' + '.join(self.targets)}  "
            f"[{self.evidence}, {self.confidence}, {self.leaves} leaves{layers}]"
        )


@dataclasses.dataclass(frozen=True)
class Tie:
    """Source and template modules that fit each other equally well: one hint decides."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    reason: str = ""

    def __str__(self) -> str:
        example = f"hints=[(r'^{re.escape(self.sources[0])}\\.', '{self.targets[0]}.')]"
        reason = self.reason or (
            "equally good by every evidence (names, roles, shapes after layout, order); "
            f"give one hint, e.g. {example}"
        )
        return f"{', '.join(self.sources)} <-> {', '.join(self.targets)}: {reason}"


@dataclasses.dataclass
class Suggestion:
    """Rules that map a source onto a template, each pairing with its evidence.

    `rules` are ordinary rules (hints first); `modules` the torch module families the
    layout step needs for scanned blocks (`modules=`); `ties` what no evidence decides.
    """

    rules: list[Rule]
    modules: dict[str, str]
    pairings: list[Pairing]
    ties: list[Tie]
    unpaired: list[str]

    @property
    def ok(self) -> bool:
        return not self.ties

    def counts(self) -> dict[str, int]:
        """Leaf pairs resolved by each kind of evidence; `tree`: the pairs of the layers
        after the first, which the first layer's pairing decided."""
        out: dict[str, int] = {}
        for pairing in self.pairings:
            out[pairing.evidence] = out.get(pairing.evidence, 0) + pairing.leaves
            if pairing.layers > 1:
                out["tree"] = out.get("tree", 0) + pairing.leaves * (pairing.layers - 1)
        return out

    def problems(self) -> list[Problem]:
        return [Problem(", ".join(tie.sources), found=f"tie: {tie}") for tie in self.ties]

    def to_toml(self) -> str:
        """The rules as the CLI's `--rules` TOML, each pairing as a comment for review."""
        comments = ["suggested by bridge; review, then pass with --rules"]
        comments += [str(pairing) for pairing in self.pairings]
        comments += [f"TIE: {tie}" for tie in self.ties]
        comments += [f"unpaired: {key}" for key in self.unpaired]
        return format_rules(self.rules, self.modules, comments)

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        lines = [f"suggested {len(self.rules)} rules; leaf pairs by evidence: {counts}"]
        lines += [f"  {pairing}" for pairing in self.pairings]
        lines += [f"  TIE {tie}" for tie in self.ties]
        lines += [f"  unpaired {key}" for key in self.unpaired]
        return "\n".join(lines)


# --- rules from pairings --------------------------------------------------------------------


def _rules_of(pair: _Pair, src: Side, tgt: Side, layer_axis: int) -> list[Rule]:
    """The rules of one pairing: a rename (none where the names are one in any
    spelling), or a Split or Merge per role, along the source's axis."""
    if len(pair.sources) == len(pair.targets) == 1:
        keys = (src.key(pair.sources[0]), tgt.key(pair.targets[0]))
        if len({position_key(parse_dotted(key.replace("{i}", "0"))) for key in keys}) == 1:
            return []
        return [(src.pattern(pair.sources[0]), tgt.replacement(pair.targets[0]))]
    rules: list[Rule] = []
    for role, axis in (pair.axes or {}).items():
        if len(pair.sources) == 1:
            parts = [f"{tgt.key(t)}.{role}" for t in pair.targets]
            rules.append(Split(f"{src.key(pair.sources[0])}.{role}", parts, axis + layer_axis))
        else:
            parts = [f"{src.key(s)}.{role}" for s in pair.sources]
            rules.append(Merge(parts, f"{tgt.key(pair.targets[0])}.{role}", axis + layer_axis))
    return rules


_FAMILY_OF_LAYOUT = {"linear": "Linear", "identity": "Conv1D", "conv": "Conv"}
_FAMILY_OF_LAYOUT["conv_transpose"] = "ConvTranspose"


def _torch_family(src: Leaf, tgt: Leaf, flax_role: str, in_out: bool) -> str | None:
    """The torch module family the layout step needs to lay a leaf of a scanned block
    out (it sees no template module for one layer): the source's own, else the kernel
    layout the shapes leave; for a square weight torch's (out, in), as `layout` takes it,
    unless other weights of the state are stored (in, out) (`in_out`): then none."""
    if src.module in WEIGHT_ROLES:
        return src.module
    if flax_role == "scale":
        return "Norm"
    if flax_role == "embedding":
        return "Embedding"
    if flax_role != "kernel":
        return None
    fitting = kernel_layouts(src.shape, tgt.shape, None, tgt.module)
    if fitting == ["linear", "identity"] and not in_out:
        return "Linear"
    return _FAMILY_OF_LAYOUT.get(fitting[0]) if len(fitting) == 1 else None


def _stored_in_out(scopes: Iterable[_Scope]) -> bool:
    """Whether a weight of unknown module pairs with a kernel only as stored (in, out),
    as HF Conv1D keeps them: then a square weight's orientation is unknown."""
    for scope in scopes:
        for pair in scope.pairs:
            if len(pair.sources) != 1 or len(pair.targets) != 1:
                continue
            src, tgt = scope.done[pair.sources[0]], scope.done_targets[pair.targets[0]]
            for a, b in (role_map(src, tgt, "flax") or {}).items():
                leaf, unknown = src[a], src[a].module is None and len(src[a].shape) == 2
                if (
                    b == "kernel"
                    and unknown
                    and kernel_layouts(leaf.shape, tgt[b].shape, None, None) == ["identity"]
                ):
                    return True
    return False


def suggest(
    source: FlatState,
    template: FlatState,
    crossing: str | None,
    hints: Sequence[Rule] | None = None,
    modules: Mapping[str, str] | None = None,
) -> Suggestion:
    """The rules that map `source` (as read) onto `template` (the target's skeleton).

    `crossing` says which layout step lies between them: "flax" (torch source, Flax
    template), "torch", or None. `hints` are rules applied first, for what the
    structure cannot tell (a tie): their modules then pair by name. `modules` are the
    caller's `{pattern: torch family}`, as `convert` takes them.
    """
    original = {path[:-1] for path in source}
    source = apply_rules(dict(source), hints, Report())
    family = module_hints(modules)
    given = {path[:-1]: name for path in source if (name := family(path[:-1]))}
    source = {
        path: leaf.replace(module=given[path[:-1]]) if path[:-1] in given else leaf
        for path, leaf in source.items()
    }
    src_modules = by_module(
        {p: leaf for p, leaf in source.items() if not leaf.transient and leaf.alias_of is None}
    )
    tgt_modules = by_module(
        {p: leaf for p, leaf in template.items() if not leaf.transient and leaf.alias_of is None}
    )
    hinted = {path for path in src_modules if path not in original}

    src_indexed, tgt_indexed = indexed_families(src_modules), indexed_families(tgt_modules)
    src_families = src_indexed + stacked_families(src_modules, {f.layers for f in tgt_indexed})
    tgt_families = tgt_indexed + stacked_families(tgt_modules, {f.layers for f in src_indexed})
    aligned, family_ties = align(src_families, tgt_families)

    rules: list[Rule] = list(hints or [])
    modules: dict[str, str] = {}
    pairings: list[Pairing] = []
    ties: list[Tie] = [
        Tie((src.side().key(()),), tuple(t.side().key(()) for t in candidates))
        for src, candidates in family_ties
    ]
    in_blocks_src = {p for f, _ in aligned for p in f.members}
    in_blocks_tgt = {p for _, t in aligned for p in t.members}

    places = [_Place.of(src, tgt, crossing, hinted, given) for src, tgt in aligned]
    top = _Scope(
        {p: r for p, r in src_modules.items() if p not in in_blocks_src},
        {p: r for p, r in tgt_modules.items() if p not in in_blocks_tgt},
        crossing,
        hinted,
        set(given),
    )
    places.append(_Place(top, Side(), Side(), Side()))

    for place in places:
        place.scope.run()
    in_out = crossing == "flax" and _stored_in_out(place.scope for place in places)
    for place in places:
        scope, src_side, tgt_side = place.scope, place.source, place.target
        first_sources, first_targets = scope.done, scope.done_targets
        for pair in scope.pairs:
            target_keys = tuple(tgt_side.key(t) for t in pair.targets)
            leaves = sum(len([r for r in first_targets[t] if r != COUNTER]) for t in pair.targets)
            sources = tuple(src_side.key(s) for s in pair.sources)
            pairings.append(Pairing(sources, target_keys, pair.evidence, leaves, place.layers))
            rules += _rules_of(pair, src_side, place.written, place.layer_axis)
            if crossing == "flax":
                needed = isinstance(place.layered, Stack) or pair.sources[0] in scope.given
                modules.update(
                    _module_entries(pair, tgt_side, first_sources, first_targets, needed, in_out)
                )
        for sources, targets, reason in scope.ties:
            ties.append(
                Tie(
                    tuple(src_side.key(s) for s in sorted(sources, key=dotted)),
                    tuple(tgt_side.key(t) for t in sorted(targets, key=dotted)),
                    reason,
                )
            )
        if place.layered is not None:
            rules.append(place.layered)
    rules = in_file_order(rules)
    return Suggestion(rules, modules, pairings, ties, _unpaired(places))


@dataclasses.dataclass
class _Place:
    """A scope and where its modules live: a source family's blocks aligned with a
    template family's, or the root. `written` is where the rules put the template's
    names: a stacked source is renamed in stacked names, then unstacked (`layered`)."""

    scope: _Scope
    source: Side
    target: Side
    written: Side
    layers: int = 1
    layer_axis: int = 0
    """The source's layer axis before a module's own (a Split of a stacked tensor)."""
    layered: Stack | Unstack | None = None

    @classmethod
    def of(
        cls,
        src: Family,
        tgt: Family,
        crossing: str | None,
        hinted: set[Path],
        given: Mapping[Path, str],
    ) -> _Place:
        scope = _Scope(dict(src.first), dict(tgt.first), crossing)
        scope.hinted = {rel for rel in scope.sources if (*src.block(0), *rel) in hinted}
        scope.given = {rel for rel in scope.sources if (*src.block(0), *rel) in given}
        shown = Side(tgt.prefix, block=True, joined=tgt.joined)
        place = cls(scope, src.side(), shown, shown, src.layers)
        whole = f"{dotted(tgt.prefix)}.{{rest*}}"
        if tgt.stacked:  # per-layer keys renamed, then stacked (after layout)
            place.layered = Stack(f"{shown.key(())}.{{rest*}}", whole)
        elif src.stacked:  # stacked keys renamed into the template's names, then unstacked
            place.written, place.layer_axis = Side(tgt.prefix), 1
            place.layered = Unstack(whole, f"{shown.key(())}.{{rest*}}")
        return place


def _module_entries(
    pair: _Pair,
    tgt_side: Side,
    sources: Mapping[Path, Roles],
    targets: Mapping[Path, Roles],
    needed: bool,
    in_out: bool,
) -> dict[str, str]:
    """`modules=` entries for the template modules of one pairing, where the layout step
    needs them: in a scanned block (it sees no template module for one layer), and
    where the source's family came from `modules=` patterns the renamed keys no longer
    match."""
    out: dict[str, str] = {}
    src_roles = sources[pair.sources[0]]
    for tgt in pair.targets:
        for src_role, tgt_role in (role_map(src_roles, targets[tgt], "flax") or {}).items():
            leaf = src_roles[src_role]
            if src_role != "weight" or not needed:
                continue
            if len(pair.sources) == 1 and len(pair.targets) > 1 and pair.axes:
                shape = list(leaf.shape)
                shape[pair.axes[src_role]] //= len(pair.targets)
                leaf = shaped(leaf, tuple(shape))
            found = _torch_family(leaf, targets[tgt][tgt_role], tgt_role, in_out)
            if found:
                out[tgt_side.module_pattern(tgt)] = found
    return out


def _unpaired(places: Sequence[_Place]) -> list[str]:
    out = []
    for place in places:
        scope, src_side, tgt_side = place.scope, place.source, place.target
        tied = {p for sources, targets, _ in scope.ties for p in (*sources, *targets)}
        out += [f"source {src_side.key(p) or '(root)'}" for p in scope.sources if p not in tied]
        out += [f"template {tgt_side.key(p) or '(root)'}" for p in scope.targets if p not in tied]
        out += [
            f"source {src_side.key(s)}, template {tgt_side.key(t)}: paired by {why}, do not fit"
            for s, t, why in scope.refused
        ]
    return out
