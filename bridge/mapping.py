"""Matching source keys to target paths: user rules, the template, and the mismatch report.

The template (the target's skeleton) decides what must be filled: every target leaf gets
exactly one source leaf, and everything else is reported. Paths are compared by their
spelling-independent key (`tree.match_key`), so NNX `("layers", 0)` meets Linen
`layers_0` and torch `layers.0` without any rule.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Sequence

from bridge.errors import MismatchError
from bridge.tree import FlatState, Leaf, Path, dotted, match_key, parse_dotted

Rule = tuple[str, str]
"""`(pattern, replacement)`: a regular expression substitution on dotted source keys."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One disagreement between source and target."""

    key: str
    expected: str = ""
    found: str = ""
    nearest: str | None = None

    def __str__(self) -> str:
        text = self.key
        if self.expected:
            text += f": expected {self.expected}"
        if self.found:
            text += f", found {self.found}" if self.expected else f": {self.found}"
        if self.nearest:
            text += f" (did you mean {self.nearest!r}?)"
        return text


@dataclasses.dataclass
class Report:
    """What a conversion could not match, and what it changed on purpose.

    `missing`, `unexpected`, `mismatched` (shape, dtype, kind) and `ambiguous` (two
    sources for one target) are errors: `convert(strict=True)` raises on them.
    `dropped` (leaves a lossy edge left out), `abstract` (target leaves left as
    placeholders under `strict=False`) and `notes` are information.
    """

    missing: list[Problem] = dataclasses.field(default_factory=list)
    unexpected: list[Problem] = dataclasses.field(default_factory=list)
    mismatched: list[Problem] = dataclasses.field(default_factory=list)
    ambiguous: list[Problem] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    abstract: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.ambiguous)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise MismatchError(self)

    def __str__(self) -> str:
        sections = [
            ("missing from the source", self.missing),
            ("unexpected in the source", self.unexpected),
            ("shape/dtype/kind mismatch", self.mismatched),
            ("ambiguous", self.ambiguous),
            ("dropped (lossy conversion)", self.dropped),
            ("left abstract (no data)", self.abstract),
            ("notes", self.notes),
        ]
        lines = [
            f"{title} ({len(items)}):\n" + "\n".join(f"  {item}" for item in items)
            for title, items in sections
            if items
        ]
        return "\n".join(lines) if lines else "all leaves matched"


def describe(leaf: Leaf) -> str:
    """`"shape (3, 4) float32 [params]"`: what a report says of a leaf."""
    kind = f" [{leaf.kind}]" if leaf.kind else ""
    return f"shape {leaf.shape} {leaf.dtype}{kind}"


def apply_rules(flat: FlatState, rules: Sequence[Rule] | None, report: Report) -> FlatState:
    """Rename source keys: every rule in order, as `re.sub` on the dotted key."""
    if not rules:
        return flat
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    out: FlatState = {}
    for path, leaf in flat.items():
        key = dotted(path)
        for pattern, replacement in compiled:
            key = pattern.sub(replacement, key)
        new_path = path if key == dotted(path) else parse_dotted(key)
        if new_path in out:
            report.ambiguous.append(
                Problem(key, found=f"both {out[new_path].source!r} and {leaf.source!r}")
            )
            continue
        out[new_path] = leaf
    return out


def _nearest(key: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return close[0] if close else None


def _disagreement(source: Leaf, target: Leaf) -> tuple[str, str] | None:
    if source.shape != target.shape or source.dtype != target.dtype:
        return describe(target), describe(source)
    if source.kind and target.kind and source.kind != target.kind:
        return f"kind {target.kind}", f"kind {source.kind}"
    return None


def match(
    source: FlatState,
    template: FlatState,
    report: Report,
    spell_target: Callable[[Path, Leaf], str] = lambda path, leaf: dotted(path),
) -> FlatState:
    """Give every template leaf its source leaf; report what is missing or left over.

    The result is keyed by the template's paths and carries the template's kinds and
    metadata, overlaid with the source's metadata. A transient template leaf (RNG state)
    without a source is taken from the template. A leaf without a source keeps the
    template's value: concrete or abstract, it is reported either way.
    """
    by_key: dict[str, Path] = {}
    for path, leaf in source.items():
        key = match_key(path)
        if key in by_key:
            other = source[by_key[key]]
            report.ambiguous.append(
                Problem(key, found=f"both {other.source!r} and {leaf.source!r}")
            )
        else:
            by_key[key] = path

    out: FlatState = {}
    unfilled: dict[str, Path] = {}
    ties: list[Path] = []
    for target_path, target_leaf in template.items():
        key = match_key(target_path)
        source_path = by_key.pop(key, None)
        if source_path is None:
            out[target_path] = target_leaf.replace(source="(template)" * target_leaf.transient)
            if target_leaf.alias_of is not None:
                ties.append(target_path)
            elif target_leaf.transient:
                origin = (
                    "re-created (abstract template)"
                    if target_leaf.is_abstract
                    else "from the template"
                )
                report.notes.append(f"{spell_target(target_path, target_leaf)}: {origin}")
            else:
                unfilled[key] = target_path
            continue
        leaf = source[source_path]
        disagreement = _disagreement(leaf, target_leaf)
        if disagreement:
            expected, found = disagreement
            report.mismatched.append(
                Problem(
                    spell_target(target_path, target_leaf), expected, f"{found} at {leaf.source!r}"
                )
            )
        out[target_path] = target_leaf.replace(
            value=leaf.value,
            metadata={**target_leaf.metadata, **leaf.metadata},
            source=leaf.source,
            transform=leaf.transform,
        )

    for target_path in ties:  # tied in the target: one tensor under two names
        alias_of = template[target_path].alias_of or ()
        original = out.get(alias_of)
        if original is not None and original.source:
            out[target_path] = original.replace(alias_of=alias_of)
            spelled = spell_target(target_path, template[target_path])
            report.notes.append(f"{spelled}: tied to {spell_target(alias_of, original)}")
        else:
            unfilled[match_key(target_path)] = target_path

    leftovers = {
        key: path
        for key, path in by_key.items()
        if not source[path].transient and source[path].alias_of is None
    }
    for path in by_key.values():
        if source[path].transient:
            report.dropped.append(source[path].source)
        elif source[path].alias_of is not None:
            report.notes.append(f"{source[path].source}: tied to {dotted(source[path].alias_of)}")
    for key, target_path in unfilled.items():
        target_leaf = template[target_path]
        nearest = _nearest(key, leftovers)
        spelled = spell_target(target_path, target_leaf)
        report.missing.append(
            Problem(
                spelled,
                describe(target_leaf),
                nearest=source[leftovers[nearest]].source if nearest else None,
            )
        )
        if target_leaf.is_abstract:
            report.abstract.append(spelled)
    for key, source_path in leftovers.items():
        nearest = _nearest(key, unfilled)
        leaf = source[source_path]
        report.unexpected.append(
            Problem(
                leaf.source,
                found=describe(leaf),
                nearest=spell_target(unfilled[nearest], template[unfilled[nearest]])
                if nearest
                else None,
            )
        )
    return out
