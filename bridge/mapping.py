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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from bridge.errors import FormatError
from bridge.report import Problem, Report
from bridge.tree import (
    Cast,
    FlatState,
    Leaf,
    Path,
    changed_by,
    concatenate,
    dotted,
    index_of,
    match_key,
    narrower,
    parse_dotted,
    position_key,
    read_slice,
    split,
    stack,
    take,
)


class KeyTemplate:
    """A dotted key with named fields: `"h.{i}.attn.c_attn.{role}"`. A field matches one
    key part; `{name*}` matches one or more. Templates read both ways, which is what
    makes the structural rules below invertible (regular expressions are not)."""

    def __init__(self, text: str) -> None:
        self.text = text
        pattern = re.escape(text)
        pattern = re.sub(r"\\{(\w+)\\\*\\}", r"(?P<\1>.+)", pattern)
        pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^.]+)", pattern)
        self.regex = re.compile(pattern)

    def match(self, key: str) -> dict[str, str] | None:
        found = self.regex.fullmatch(key)
        return found.groupdict() if found else None

    def format(self, fields: Mapping[str, str]) -> str:
        return re.sub(r"\{(\w+)\*?\}", lambda m: fields[m.group(1)], self.text)


@dataclasses.dataclass(frozen=True)
class Split:
    """One fused tensor -> equal parts along `axis`: `Split("{p*}.c_attn.{r}",
    ["{p*}.q.{r}", "{p*}.k.{r}", "{p*}.v.{r}"], axis=-1)`. Split and Merge act on the
    source as read, before layout conversion: `axis` is in the source's layout."""

    fused: str
    parts: Sequence[str]
    axis: int = 0

    def inverse(self, axis: int | None = None) -> Merge:
        """The rule for the other direction; `axis` where the other side's layout puts
        the fused axis elsewhere (torch Linear (out, in) vs Flax kernel (in, out))."""
        return Merge(self.parts, self.fused, self.axis if axis is None else axis)


@dataclasses.dataclass(frozen=True)
class Merge:
    """Several tensors -> one, concatenated along `axis` in the order of `parts`."""

    parts: Sequence[str]
    fused: str
    axis: int = 0

    def inverse(self, axis: int | None = None) -> Split:
        """The rule for the other direction; `axis` where the other side's layout puts
        the fused axis elsewhere (torch Linear (out, in) vs Flax kernel (in, out))."""
        return Split(self.fused, self.parts, self.axis if axis is None else axis)


@dataclasses.dataclass(frozen=True)
class Stack:
    """Per-layer tensors -> one scanned tensor: `Stack("layers.{i}.{rest*}",
    "layers.{rest*}", over="i")` stacks along `axis` in the order of the index. Stacking
    runs after layout conversion, on the Flax side, where scanned tensors live."""

    layers: str
    stacked: str
    over: str = "i"
    axis: int = 0

    def inverse(self) -> Unstack:
        return Unstack(self.stacked, self.layers, self.over, self.axis)


@dataclasses.dataclass(frozen=True)
class Unstack:
    """One scanned tensor -> per-layer tensors (the inverse of `Stack`); runs before
    layout conversion, on the Flax side."""

    stacked: str
    layers: str
    over: str = "i"
    axis: int = 0

    def inverse(self) -> Stack:
        return Stack(self.layers, self.stacked, self.over, self.axis)


Rule = tuple[str, str] | Split | Merge | Stack | Unstack
"""`(pattern, replacement)`: a regular expression substitution on dotted source keys;
or a structural rule (`Split`, `Merge`, `Stack`, `Unstack`) over key templates."""


def describe(leaf: Leaf) -> str:
    """`"shape (3, 4) float32 [params]"`: what a report says of a leaf."""
    kind = f" [{leaf.kind}]" if leaf.kind else ""
    return f"shape {leaf.shape} {leaf.dtype}{kind}"


def _rename(rule: tuple[str, str], flat: FlatState, report: Report) -> FlatState:
    try:  # the empty alternative matches "", so the replacement is expanded once
        pattern, replacement = re.compile(rule[0]), rule[1]
        re.compile(f"(?:{rule[0]})|").sub(replacement, "")
    except (re.error, IndexError, TypeError) as error:
        raise FormatError(f"rule {rule!r}: not a regular expression rename: {error}") from None
    out: FlatState = {}
    for path, leaf in flat.items():
        key = pattern.sub(replacement, dotted(path))
        _put(out, path if key == dotted(path) else parse_dotted(key), leaf, report)
    return out


def _put(out: FlatState, path: Path, leaf: Leaf, report: Report) -> None:
    """Add a renamed leaf; two sources that now share one key are refused."""
    if path in out:
        raise FormatError(
            f"rules make both {out[path].source!r} and {leaf.source!r} {dotted(path)!r}; "
            "a rule may rename a key, never merge two (use Merge to fuse tensors)"
        )
    out[path] = leaf


def _steps(leaf: Leaf, step: str) -> str:
    return f"{leaf.transform}, {step}" if leaf.transform else step


def _split(rule: Split, flat: FlatState, report: Report) -> FlatState:
    fused, parts = KeyTemplate(rule.fused), [KeyTemplate(part) for part in rule.parts]
    out: FlatState = {}
    for path, leaf in flat.items():
        fields = fused.match(dotted(path))
        if fields is None:
            _put(out, path, leaf, report)
            continue
        for index, part in enumerate(parts):
            piece = leaf.replace(
                value=split(leaf.value, len(parts), index, rule.axis),
                transform=_steps(leaf, f"split {index + 1}/{len(parts)}"),
            )
            _put(out, parse_dotted(part.format(fields)), piece, report)
    return out


def _merge(rule: Merge, flat: FlatState, report: Report) -> FlatState:
    fused, parts = KeyTemplate(rule.fused), [KeyTemplate(part) for part in rule.parts]
    groups: dict[str, dict[int, Path]] = {}
    for path in flat:
        for index, part in enumerate(parts):
            if (fields := part.match(dotted(path))) is not None:
                groups.setdefault(fused.format(fields), {})[index] = path
                break
    merged = {key: group for key, group in groups.items() if len(group) == len(parts)}
    consumed = {path for group in merged.values() for path in group.values()}
    out: FlatState = {}
    for path, leaf in flat.items():
        if path not in consumed:
            _put(out, path, leaf, report)
    for key, group in merged.items():
        leaves = [flat[group[index]] for index in range(len(parts))]
        value = concatenate([leaf.value for leaf in leaves], rule.axis)
        source = " + ".join(leaf.source for leaf in leaves)
        step = f"concatenate {len(parts)}"
        _put(
            out,
            parse_dotted(key),
            leaves[0].replace(value=value, source=source, transform=step),
            report,
        )
    return out


def _stack(rule: Stack, flat: FlatState, report: Report) -> FlatState:
    layers, stacked = KeyTemplate(rule.layers), KeyTemplate(rule.stacked)
    groups: dict[str, dict[int, Path]] = {}
    out: FlatState = {}
    for path, leaf in flat.items():
        fields = layers.match(dotted(path))
        index = None if fields is None else index_of(fields[rule.over])
        if index is None:
            _put(out, path, leaf, report)
            continue
        groups.setdefault(stacked.format(fields), {})[index] = path
    for key, group in groups.items():
        if sorted(group) != list(range(len(group))):
            found = f"layers {sorted(group)} of {key!r}: not 0..{len(group) - 1}"
            report.ambiguous.append(Problem(key, found=found))
            continue
        leaves = [flat[group[index]] for index in range(len(group))]
        source = (
            leaves[0].source if len(leaves) == 1 else f"{leaves[0].source} .. {leaves[-1].source}"
        )
        value = stack([leaf.value for leaf in leaves], rule.axis)
        _put(
            out,
            parse_dotted(key),
            leaves[0].replace(
                value=value, source=source, transform=_steps(leaves[0], f"stack {len(leaves)}")
            ),
            report,
        )
    return out


def _unstack(rule: Unstack, flat: FlatState, report: Report) -> FlatState:
    stacked, layers = KeyTemplate(rule.stacked), KeyTemplate(rule.layers)
    out: FlatState = {}
    for path, leaf in flat.items():
        fields = stacked.match(dotted(path))
        if fields is None:
            _put(out, path, leaf, report)
            continue
        count = leaf.shape[rule.axis]
        for index in range(count):
            layer = leaf.replace(
                value=take(leaf.value, index, rule.axis),
                transform=_steps(leaf, f"unstack {index}/{count}"),
            )
            _put(out, parse_dotted(layers.format({**fields, rule.over: str(index)})), layer, report)
    return out


_APPLY: dict[type, Callable[[Any, FlatState, Report], FlatState]] = {
    tuple: _rename,
    list: _rename,
    Split: _split,
    Merge: _merge,
    Stack: _stack,
    Unstack: _unstack,
}


def apply_rules(
    flat: FlatState, rules: Sequence[Rule] | None, report: Report, *, stacking: bool = False
) -> FlatState:
    """Apply `rules` in order: with `stacking=False` every rule but `Stack` (on the
    source as read), with `stacking=True` the `Stack` rules only (after layout)."""
    for rule in rules or ():
        if isinstance(rule, Stack) == stacking:
            try:
                flat = _APPLY[type(rule)](rule, flat, report)
            except KeyError:
                raise TypeError(f"not a rule: {rule!r}") from None
    return flat


def _nearest(key: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return close[0] if close else None


def _narrowed(leaf: Leaf, target: Leaf, spelled: str, report: Report, read_values: bool) -> Leaf:
    """`leaf` cast to the template's narrower dtype, when no value changes (checked now,
    or at conversion when `read_values` is False); unchanged (a dtype mismatch for the
    report) when one would."""
    step = f"narrow {leaf.dtype} -> {target.dtype}"
    if read_values and not leaf.is_abstract:
        changed = changed_by(leaf.value, target.dtype)
        if changed is not None:
            value = np.asarray(read_slice(leaf.value))[changed].item()
            return leaf.replace(
                transform=_steps(leaf, f"{step} would change {value!r} at index {changed}")
            )
    report.notes.append(f"{spelled}: {step}, as the template asks; every value kept exactly")
    return leaf.replace(
        value=Cast(leaf.value, np.dtype(target.dtype)), transform=_steps(leaf, step)
    )


def _disagreement(source: Leaf, target: Leaf) -> tuple[str, str] | None:
    if source.shape != target.shape or source.dtype != target.dtype:
        after = f" after {source.transform}" if source.transform else ""
        return describe(target), describe(source) + after
    if source.kind and target.kind and source.kind != target.kind:
        return f"kind {target.kind}", f"kind {source.kind}"
    return None


def _by_position(by_key: Mapping[str, Path], target_keys: Mapping[str, Path]) -> dict[str, str]:
    """`{source key: template key}` for the sources that fill a template leaf by position
    alone (`layer.0` -> a Linen module named '0', see `tree.position_key`): only where
    the exact keys do not meet and exactly one source and one target share a position."""
    sources: dict[str, list[str]] = {}
    for key, path in by_key.items():
        if key not in target_keys:
            sources.setdefault(position_key(path), []).append(key)
    targets: dict[str, list[str]] = {}
    for key, path in target_keys.items():
        if key not in by_key:
            targets.setdefault(position_key(path), []).append(key)
    return {
        keys[0]: targets[position][0]
        for position, keys in sources.items()
        if len(keys) == 1 and len(targets.get(position, ())) == 1
    }


def match(
    source: FlatState,
    template: FlatState,
    report: Report,
    spell_target: Callable[[Path, Leaf], str] = lambda path, leaf: dotted(path),
    read_values: bool = True,
) -> FlatState:
    """Give every template leaf its source leaf; report what is missing or left over.

    A 64-bit source leaf fills a template leaf of half its width (the 32-bit arrays JAX
    makes by default) only if every value survives: `read_values=False` (plans) defers
    that check to the conversion.

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
    keyed = [(match_key(path), path) for path in template]
    for source_key, target_key in _by_position(by_key, dict(keyed)).items():
        by_key[target_key] = by_key.pop(source_key)

    out: FlatState = {}
    unfilled: dict[str, Path] = {}
    ties: list[Path] = []
    for key, target_path in keyed:
        target_leaf = template[target_path]
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
        if leaf.shape == target_leaf.shape and narrower(leaf.dtype, target_leaf.dtype):
            spelled = spell_target(target_path, target_leaf)
            leaf = _narrowed(leaf, target_leaf, spelled, report, read_values)
        disagreement = _disagreement(leaf, target_leaf)
        if disagreement:
            expected, found = disagreement
            spelled = spell_target(target_path, target_leaf)
            report.mismatched.append(Problem(spelled, expected, f"{found} at {leaf.source!r}"))
            out[target_path] = target_leaf  # not filled: strict=False keeps the template's
            if target_leaf.is_abstract:
                report.abstract.append(spelled)
            continue
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
