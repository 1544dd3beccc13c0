"""What the `bridge` command prints: rich tables and trees for people, one JSON document
for scripts (`--json`)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from bridge.api import Inspection, Plan
from bridge.diff import Diff
from bridge.graph import Edge, Format
from bridge.report import Report
from bridge.suggest import Suggestion


def dump(document: Any) -> None:
    """The one JSON document of a `--json` run, on stdout."""
    print(json.dumps(document, indent=2, default=str))


def console() -> Console:
    """Rich on stdout; wide when not a terminal so that piped tables keep whole keys."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=int(os.environ.get("COLUMNS", "200")), no_color=True)


def size(nbytes: int) -> str:
    """`nbytes` for people: 92 B, 1.5 KiB, ..."""
    scaled = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if scaled < 1024 or unit == "TiB":
            return f"{int(scaled)} {unit}" if unit == "B" else f"{scaled:.1f} {unit}"
        scaled /= 1024
    return f"{nbytes} B"  # pragma: no cover


def _table(title: str | None, columns: tuple[str, ...], caption: str | None = None) -> Table:
    """A table whose `bytes` column is right-aligned."""
    table = Table(title=title, caption=caption)
    for column in columns:
        table.add_column(column, justify="right" if column == "bytes" else "left")
    return table


def report_json(report: Report) -> dict[str, Any]:
    def problems(items: list[Any]) -> list[dict[str, Any]]:
        return [
            {"key": p.key, "expected": p.expected, "found": p.found, "nearest": p.nearest}
            for p in items
        ]

    return {
        "ok": report.ok,
        "missing": problems(report.missing),
        "unexpected": problems(report.unexpected),
        "mismatched": problems(report.mismatched),
        "ambiguous": problems(report.ambiguous),
        "dropped": list(report.dropped),
        "abstract": list(report.abstract),
        "notes": list(report.notes),
    }


def edge_json(edge: Edge) -> dict[str, Any]:
    return {
        "src": edge.src,
        "dst": edge.dst,
        "cost": edge.cost,
        "lossy": edge.lossy,
        "loses": edge.loses,
        "needs": sorted(edge.needs),
    }


def formats_json(formats: dict[str, Format], edges: list[Edge]) -> dict[str, Any]:
    return {
        "formats": [
            {
                "name": n,
                "description": f.description,
                "options": sorted(f.options),
                "read_options": sorted(f.read_options),
            }
            for n, f in sorted(formats.items())
        ],
        "conversions": [edge_json(e) for e in edges],
    }


def print_formats(formats: dict[str, Format], edges: list[Edge]) -> None:
    out = console()
    table = _table("formats", ("name", "description", "write options", "read options"))
    for name, fmt in sorted(formats.items()):
        table.add_row(
            name,
            fmt.description,
            ", ".join(sorted(fmt.options)) or "-",
            ", ".join(sorted(fmt.read_options)) or "-",
        )
    out.print(table)
    table = _table("conversions", ("edge", "cost", "lossy", "needs"))
    for e in sorted(edges, key=lambda e: (e.src, e.dst)):
        lossy = f"yes: {e.loses or 'drops data'}" if e.lossy else "no"
        table.add_row(f"{e.src} -> {e.dst}", f"{e.cost:g}", lossy, ", ".join(sorted(e.needs)))
    out.print(table)


def inspection_json(path: str, found: Inspection) -> dict[str, Any]:
    return {
        "path": path,
        "format": found.format,
        "arrays": len(found.rows),
        "bytes": found.nbytes,
        "leaves": [
            {"key": r.target, "shape": list(r.shape), "dtype": r.dtype, "bytes": r.nbytes}
            for r in found.rows
        ],
    }


def print_inspection(path: str, found: Inspection, flat: bool) -> None:
    """A tree of the keys (a table with `flat`), then the totals."""
    out = console()
    total = f"{len(found.rows)} arrays, {found.nbytes:,} bytes ({size(found.nbytes)})"
    if flat:
        table = _table(f"{path} ({found.format})", ("key", "shape", "dtype", "bytes"), total)
        for r in found.rows:
            table.add_row(r.target, str(r.shape), r.dtype, f"{r.nbytes:,}")
        out.print(table)
        return
    tree = Tree(f"[bold]{path}[/bold] ({found.format})")
    nodes: dict[tuple[str, ...], Tree] = {(): tree}
    for r in found.rows:
        parts = r.target.split("/") if "/" in r.target else r.target.split(".")
        for depth in range(1, len(parts)):
            prefix = tuple(parts[:depth])
            if prefix not in nodes:
                nodes[prefix] = nodes[prefix[:-1]].add(parts[depth - 1])
        nodes[tuple(parts[:-1])].add(f"{parts[-1]}  {r.shape} {r.dtype}  {size(r.nbytes)}")
    out.print(tree)
    out.print(f"{found.format}: {total}")


def plan_json(found: Plan) -> dict[str, Any]:
    return {
        "source": found.source,
        "target": found.target,
        "route": [edge_json(e) for e in found.route],
        "lossy": found.lossy,
        "leaves": len(found.rows),
        "bytes": found.nbytes,
        "rows": [
            {
                "source": r.source,
                "target": r.target,
                "transform": r.transform,
                "dtype": r.dtype,
                "shape": list(r.shape),
                "bytes": r.nbytes,
            }
            for r in found.rows
        ],
        "report": report_json(found.report),
        **({"suggestion": suggestion_json(found.suggestion)} if found.suggestion else {}),
    }


def suggestion_json(found: Suggestion) -> dict[str, Any]:
    return {
        "pairings": [dataclasses.asdict(p) | {"confidence": p.confidence} for p in found.pairings],
        "ties": [dataclasses.asdict(tie) for tie in found.ties],
        "evidence": found.counts(),
        "rules_toml": found.to_toml(),
    }


def print_plan(found: Plan) -> None:
    """The route, a row per target leaf, and the report."""
    out = console()
    hops = " ; ".join(str(e) for e in found.route) or "(same format)"
    out.print(f"plan {found.source} -> {found.target}: {hops}", highlight=False)
    caption = f"{len(found.rows)} leaves, {found.nbytes:,} bytes ({size(found.nbytes)})"
    columns = ("source", "target", "transform", "shape", "dtype", "bytes")
    table = _table(None, columns, caption)
    for r in found.rows:
        row = (r.source or "(none)", r.target, r.transform or "-", str(r.shape), r.dtype)
        table.add_row(*row, f"{r.nbytes:,}")
    out.print(table)
    if found.suggestion is not None:
        out.print(str(found.suggestion), markup=False, highlight=False)
    out.print(str(found.report), markup=False, highlight=False)


def diff_json(sides: dict[str, tuple[str, str, int]], found: Diff) -> dict[str, Any]:
    """`sides`: `{"a": (path, format, arrays), "b": ...}`."""
    return {
        **{
            side: {"path": path, "format": fmt, "arrays": arrays}
            for side, (path, fmt, arrays) in sides.items()
        },
        "comparison": found.comparison.to_json(),
        "equal": found.equal,
        "only_a": found.only_a,
        "only_b": found.only_b,
        "shape": found.shapes,
        "dtype": found.dtypes,
        "values": found.values,
    }


def print_diff(title: str, found: Diff) -> None:
    table = _table(title, ("key", "difference", "a", "b"), f"values compared {found.comparison}")
    for key in found.only_a:
        table.add_row(key, "only in a", "present", "-")
    for key in found.only_b:
        table.add_row(key, "only in b", "-", "present")
    for row in found.shapes:
        table.add_row(row["key"], "shape", str(tuple(row["a"])), str(tuple(row["b"])))
    for row in found.dtypes:
        table.add_row(row["key"], "dtype", row["a"], row["b"])
    for row in found.values:
        gap = "" if row["max_abs_diff"] is None else f", max |a-b| {row['max_abs_diff']:.3g}"
        table.add_row(row["key"], f"values ({row['elements']} elements{gap})", "", "")
    console().print(table)
