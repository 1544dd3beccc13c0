"""The public functions. They are thin: detect the source, ask the graph for a route,
read, transform along the route, match against the template, write."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

from bridge import collector, multihost
from bridge.errors import MismatchError
from bridge.graph import GRAPH, Context, Edge, Format
from bridge.layout import to_flax, to_torch
from bridge.mapping import Rule, apply_rules, match
from bridge.report import Report
from bridge.stream import batch_bytes, is_file_to_file
from bridge.suggest import Suggestion, suggest
from bridge.tree import FlatState, cast_floating, cast_target


def detect(obj: Any) -> str:
    """The name of `obj`'s format; a `FormatError` saying why when none fits."""
    return GRAPH.detect(obj)


def registered_formats() -> dict[str, Format]:
    """The registered formats by name (built-in and `register_format`ed); the adapters
    themselves are the subpackage `bridge.formats`."""
    return dict(GRAPH.formats)


def conversions() -> list[Edge]:
    """Every registered edge."""
    return [edge for out in GRAPH.edges.values() for edge in out.values()]


def route(src: str, dst: str) -> list[Edge]:
    """The hops `convert` takes from `src` to `dst`, whatever the call provides."""
    return GRAPH.route(src, dst)


Rules = Sequence[Rule] | Literal["auto"] | None
"""Rules to apply, or "auto": suggested from the structure of source and template."""


def _named(obj: Any) -> str:
    return f" {os.fspath(obj)!r}" if isinstance(obj, str | os.PathLike) else ""


def _run(
    obj: Any,
    to: str,
    source: str | None,
    template: Any,
    rules: Rules,
    strict: bool,
    options: dict[str, Any],
    dry: bool = False,
) -> tuple[str, list[Edge], FlatState, Context, Suggestion | None]:
    """Everything `convert` does but writing the target; `dry` reads no array data
    (the source's `inspect` where it has one), for plans. `rules="auto"` suggests the
    rules from the structure of source and template (`hints=` first)."""
    src = source or GRAPH.detect(obj)
    auto = isinstance(rules, str) and rules == "auto"
    hints = options.pop("hints", None) if auto else None
    ctx = Context(template, list(rules) if rules and not auto else None, strict, options)
    ctx.source = src
    # one process streams; under jax.distributed every step is agreed, not batched
    ctx.streaming = is_file_to_file(obj, options) and multihost.processes() == 1
    batch_bytes(ctx)  # a wrong size is refused before anything is read
    ctx.report.subject = f"{src}{_named(obj)} -> {to}"
    hops = GRAPH.route(src, to, ctx.satisfies())
    src_format, dst_format = GRAPH.format(src), GRAPH.format(to)
    template_format = None if template is None else GRAPH.format(GRAPH.detect(template))
    known = frozenset().union(
        {"dtype", "casting", "progress", "batch_bytes", "threads"},
        dst_format.options,  # only the target's writer runs; the formats before it are read
        src_format.read_options,
        *(GRAPH.format(e.dst).read_options for e in hops),
    )
    if unknown := sorted(set(options) - known):
        raise TypeError(
            f"unknown option(s) {unknown} for {src} -> {to}; known: {sorted(known) or 'none'}"
        )
    dtype = options.get("dtype")
    target = None if dtype is None else cast_target(dtype, options.get("casting", "same_kind"))
    if template_format is not None:  # a file template gives its skeleton: no array data read
        ctx.template_flat = (template_format.inspect or template_format.read)(template, ctx)
    owner, owner_format = (template, template_format) if template_format else (obj, src_format)
    if owner_format.checkpoint is not None:  # the files' layout of a transformers model
        ctx.checkpoint = owner_format.checkpoint(owner)
    read = (src_format.inspect or src_format.read) if dry else src_format.read
    flat = {
        path: leaf.replace(
            source=src_format.spell(path, leaf), value=multihost.gathered(leaf.value)
        )
        for path, leaf in read(obj, ctx).items()
    }
    suggestion = _suggest(flat, ctx, hops, hints) if auto else None
    flat = apply_rules(flat, ctx.rules, ctx.report)
    for edge in hops:
        if edge.transform is not None:
            flat = edge.transform(flat, ctx)
    flat = apply_rules(flat, ctx.rules, ctx.report, stacking=True)
    if target is not None:
        flat = cast_floating(flat, target)
    if ctx.checkpoint is not None:
        flat = ctx.checkpoint.from_files(flat, ctx)
    if ctx.template_flat is not None:
        flat = match(flat, ctx.template_flat, ctx.report, dst_format.spell, read_values=not dry)
    if ctx.checkpoint is not None and dst_format.checkpoint_files:
        flat = ctx.checkpoint.to_files(flat, ctx)
        ctx.companions = ctx.checkpoint.companions(flat, ctx)
    return src, hops, flat, ctx, suggestion


def _suggest(
    flat: FlatState, ctx: Context, hops: list[Edge], hints: Sequence[Rule] | None
) -> Suggestion:
    """Suggest the rules into `ctx`: its rules, the module families the renamed keys
    need (after the caller's own patterns), and every tie as an ambiguity."""
    if ctx.template_flat is None:
        raise TypeError('rules="auto" pairs the source with a template: pass template=...')
    layouts = [edge.transform for edge in hops if edge.transform in (to_flax, to_torch)]
    crossing = None if not layouts else "flax" if layouts[0] is to_flax else "torch"
    found = suggest(flat, ctx.template_flat, crossing, hints, ctx.options.get("modules"))
    ctx.rules = found.rules
    if found.modules:  # the caller's patterns first: the first that matches decides
        given = dict(ctx.options.get("modules") or {})
        added = {key: name for key, name in found.modules.items() if key not in given}
        ctx.options = {**ctx.options, "modules": {**given, **added}}
    ctx.report.ambiguous.extend(found.problems())
    counts = ", ".join(f"{kind} {n}" for kind, n in found.counts().items())
    ctx.report.notes.append(f"rules suggested from the structure ({counts} leaf pairs)")
    return found


@overload
def convert(
    obj: Any,
    to: str,
    *,
    source: str | None = ...,
    template: Any = ...,
    rules: Rules = ...,
    strict: Literal[True] = ...,
    **options: Any,
) -> Any: ...
@overload
def convert(
    obj: Any,
    to: str,
    *,
    source: str | None = ...,
    template: Any = ...,
    rules: Rules = ...,
    strict: Literal[False],
    **options: Any,
) -> tuple[Any, Report]: ...
def convert(
    obj: Any,
    to: str,
    *,
    source: str | None = None,
    template: Any = None,
    rules: Rules = None,
    strict: bool = True,
    **options: Any,
) -> Any:
    """Convert `obj` to format `to` along the cheapest lossless route.

    `template` is the target's skeleton (concrete or abstract); every one of its leaves
    must receive exactly one source leaf. `rules` rename source keys first;
    `rules="auto"` suggests them from the structure of both sides (see `suggest_rules`;
    `hints=` takes partial rules for what it cannot tell), and any tie is a mismatch. With
    `strict=True` any mismatch raises `MismatchError`; with `strict=False` the call
    returns `(result, report)` and the report lists every leaf it could not fill.

    `dtype=` casts every floating-point leaf (integer and bool leaves stay as they are)
    to another floating type, e.g. `dtype="bfloat16"`. A cast to an integer or bool dtype
    rounds, wraps or truncates values: it is a `FormatError` unless asked for with
    `casting="unsafe"` (numpy's name for such casts).
    """
    saving = options.get("path") is not None  # under jax.distributed, on every process
    with multihost.gathering(saving):
        with multihost.together(f"{_named(obj).strip() or to}: reading", collective=saving):
            with collector.paused():
                _, _, flat, ctx, _ = _run(obj, to, source, template, rules, strict, options)
            if strict and not ctx.report.ok:
                raise MismatchError(ctx.report)
        # an object is built under the pause; a file's writer (Orbax's event loop, say)
        # runs with the collector, as it would without bridge
        with contextlib.nullcontext() if saving else collector.paused():
            result = GRAPH.format(to).write(flat, ctx)
    return result if strict else (result, ctx.report)


def _dtype_names() -> Callable[[Any], str]:
    """`str(dtype)`, spelled once per dtype of one table: numpy spells a dtype in Python,
    a cost a table of 50,000 leaves notices."""
    names: dict[Any, str] = {}

    def name(dtype: Any) -> str:
        if dtype not in names:
            names[dtype] = str(dtype)
        return names[dtype]

    return name


@dataclasses.dataclass(frozen=True)
class PlanRow:
    source: str
    target: str
    transform: str
    dtype: str
    nbytes: int
    shape: tuple[int, ...] = ()


def _table(cells: list[tuple[str, ...]], footer: str) -> str:
    """Left-aligned columns, the last (bytes) right-aligned, a rule under the header."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    last = len(widths) - 1
    lines = [
        "  ".join(
            cell.rjust(width) if i == last else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join([*lines, footer])


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `convert` would do, computed without moving data: the route, one row per
    target leaf, and the report of what would not match."""

    source: str
    target: str
    route: list[Edge]
    rows: list[PlanRow]
    report: Report
    suggestion: Suggestion | None = None
    """The rules `rules="auto"` suggested, with the evidence of each pairing."""

    @property
    def lossy(self) -> bool:
        return any(edge.lossy for edge in self.route)

    @property
    def nbytes(self) -> int:
        return sum(row.nbytes for row in self.rows)

    def __str__(self) -> str:
        hops = " ; ".join(str(edge) for edge in self.route) or "(same format)"
        header = ("source", "target", "transform", "dtype", "bytes")
        cells = [header] + [
            (row.source or "(none)", row.target, row.transform or "-", row.dtype, f"{row.nbytes:,}")
            for row in self.rows
        ]
        table = _table(cells, f"{len(self.rows)} leaves, {self.nbytes:,} bytes")
        suggested = f"{self.suggestion}\n" if self.suggestion else ""
        return f"plan {self.source} -> {self.target}: {hops}\n{suggested}{table}\n{self.report}"


def plan(
    obj: Any,
    to: str,
    *,
    source: str | None = None,
    template: Any = None,
    rules: Rules = None,
    strict: bool = True,
    **options: Any,
) -> Plan:
    """The route and per-leaf table `convert` would use, without moving any data."""
    with collector.paused():
        src, hops, flat, ctx, found = _run(
            obj, to, source, template, rules, strict, options, dry=True
        )
        spell, dtype_name = GRAPH.format(to).spell, _dtype_names()
        rows = [
            PlanRow(
                leaf.source,
                spell(path, leaf),
                leaf.transform,
                dtype_name(leaf.dtype),
                leaf.nbytes,
                leaf.shape,
            )
            for path, leaf in flat.items()
        ]
    return Plan(src, to, hops, rows, ctx.report, found)


def suggest_rules(
    obj: Any,
    *,
    template: Any,
    to: str | None = None,
    source: str | None = None,
    hints: Sequence[Rule] | None = None,
    **options: Any,
) -> Suggestion:
    """The rules that map `obj` onto `template` when their names differ, proposed from
    the structure of both sides, each pairing with its evidence and confidence; ties
    (modules no evidence tells apart) are listed, never decided: give `hints=` (partial
    rules) for them. Repeated blocks (`layers.{i}`, Linen's `layers_{i}`) align with
    repeated or scanned ones: a scanned template gets a `Stack`, a scanned source an
    `Unstack`. `to` defaults to the template's format; options as for `convert`.
    Reads no array data."""
    target = to or GRAPH.detect(template)
    found = plan(
        obj, target, source=source, template=template, rules="auto", hints=hints, **options
    )
    assert found.suggestion is not None  # rules="auto" always suggests
    return found.suggestion


def save(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    format: str,
    template: Any = None,
    overwrite: bool = False,
    **options: Any,
) -> pathlib.Path:
    """Write `obj` to `path` in a file format (`"safetensors"`, ...), atomically.

    Saving a file or directory (safetensors, an HF directory, an Orbax checkpoint, a
    msgpack file) into another streams: leaves are read, laid out and written in batches
    of `batch_bytes=` (default 64 MiB), so memory holds one batch, not the model.

    An existing output is replaced only with `overwrite=True`, and only by one of its
    kind: a directory never becomes a file, nor a file a directory. A safetensors
    directory is updated as `save_pretrained` updates it: its weight files are replaced
    (which needs `overwrite`), every other file is kept. An Orbax checkpoint directory is
    replaced whole.
    """
    return convert(
        obj, to=format, template=template, path=os.fspath(path), overwrite=overwrite, **options
    )


def load(path: str | os.PathLike[str], to: str, **kwargs: Any) -> Any:
    """Read the file or directory at `path` into format `to` (same arguments as convert)."""
    return convert(os.fspath(path), to, **kwargs)


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What a file or object holds, read without its array data: format, and per leaf
    key, shape, dtype and bytes; `print()` gives a table with totals."""

    format: str
    rows: list[PlanRow]

    @property
    def nbytes(self) -> int:
        return sum(row.nbytes for row in self.rows)

    def __str__(self) -> str:
        header = ("key", "shape", "dtype", "bytes")
        cells = [header] + [
            (row.target, str(row.shape), row.dtype, f"{row.nbytes:,}") for row in self.rows
        ]
        return _table(cells, f"{self.format}: {len(self.rows)} arrays, {self.nbytes:,} bytes")


def inspect(obj: Any, *, source: str | None = None, **options: Any) -> Inspection:
    """Format, keys, shapes, dtypes and bytes of `obj` (a path, or an object), reading
    no array data where the format allows (safetensors headers, Orbax metadata)."""
    name = source or GRAPH.detect(obj)
    fmt = GRAPH.format(name)
    ctx = Context(options=options, source=name)
    ctx.report.subject = f"{name}{_named(obj)}"
    with collector.paused():
        if fmt.describe is not None:
            arrays = fmt.describe(obj, ctx)
        else:
            flat = (fmt.inspect or fmt.read)(obj, ctx)
            arrays = (
                (fmt.spell(path, leaf), leaf.dtype, leaf.shape, leaf.nbytes)
                for path, leaf in flat.items()
            )
        dtype_name = _dtype_names()
        rows = [
            PlanRow("", key, "", dtype_name(dtype), nbytes, shape)
            for key, dtype, shape, nbytes in arrays
        ]
    return Inspection(name, rows)
