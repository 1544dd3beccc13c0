r"""The `bridge` command: look into checkpoints, plan and run conversions, compare states.

    bridge formats                                   the formats and the conversions between them
    bridge inspect PATH [--json]                     keys, shapes, dtypes and bytes, no array data
    bridge plan SRC --to FORMAT [...] [--json]       the route and per-leaf table, no data moved
    bridge convert SRC DST --to FORMAT [...]         convert and write DST
    bridge diff A B [--rtol R --atol A | --exact]    what differs between two states, any formats

`convert` writes files: `--to safetensors | orbax | msgpack`, or `--to torch` with a
`.pt`/`.bin`/`.pth` DST (the state_dict saved with `torch.save`). In-memory formats
(`nnx`, `nnx_state`, `linen`) are reached through the Python API.

Options shared by `plan` and `convert`:

- `--template module:factory`: import `module` (a dotted module name, or the path of a
  `.py` file) and call `factory()`; it returns the target's skeleton: an NNX model (built
  abstractly, e.g. with `nnx.eval_shape`), an `nnx.State`, Linen (abstract) variables,
  a Linen module with sample inputs as a tuple `(module, *inputs)` (inputs may be
  `jax.ShapeDtypeStruct`s; the variables' shapes come from `jax.eval_shape` of
  `module.init`, no weights computed; flags are passed as they are, and a trailing dict
  holds keyword arguments), or a torch module. Without `:factory`, `module` must define
  `template`, the skeleton itself (not called).
- `--rules FILE.toml`: key rules, in this schema (every table optional)::

      [[rename]]                  # regular expression on dotted source keys
      pattern = "^Dense_(\\d+)"
      replacement = "layers.\\1"

      [[split]]                   # one fused tensor -> equal parts (source layout)
      fused = "{p*}.c_attn.{r}"
      parts = ["{p*}.q.{r}", "{p*}.k.{r}", "{p*}.v.{r}"]
      axis = -1

      [[merge]]                   # several tensors -> one, in the order of `parts`
      parts = ["{p*}.q.{r}", "{p*}.k.{r}", "{p*}.v.{r}"]
      fused = "{p*}.qkv.{r}"
      axis = 0

      [[stack]]                   # per-layer tensors -> one scanned tensor (Flax side)
      layers = "layers.{i}.{rest*}"
      stacked = "layers.{rest*}"
      over = "i"                  # optional, the field that numbers the layers
      axis = 0                    # optional

      [[unstack]]                 # the inverse of stack
      stacked = "layers.{rest*}"
      layers = "layers.{i}.{rest*}"

      [modules]                   # torch module family of the modules whose dotted
      "\\.c_proj$" = "Conv1D"      # name matches (decides the layout rule)

  Rules apply in this order: renames, splits, merges, unstacks (each in file order);
  stacks run after the layout conversion. `{name}` matches one key part, `{name*}` one
  or more.
- `--modules FILE.toml`: the `[modules]` table of FILE (or its top-level string
  entries): `pattern = "Family"`, e.g. `"\\.c_proj$" = "Conv1D"`.
- `--dtype bf16|fp16|fp32|...`: cast floating-point leaves to another floating type;
  `--casting unsafe` lets it cast them to an integer or bool type (values rounded,
  wrapped or truncated: never by mistake).
- `--no-strict`: fill what matches and report the rest instead of failing.

`diff` compares values as numbers, equal within `--rtol` / `--atol` (0 unless given;
NaN equals NaN, -0.0 equals 0.0), or with `--exact` bit for bit; it says which.

Exit status: 0 success; 1 a mismatch (convert, strict plan) or a difference (diff);
2 a usage or input error. Every failure is one line on stderr (`--debug` adds the
traceback); with `--json`, stdout holds one JSON document, on error too:
`{"error": {"type": ..., "message": ..., "path": ...}}` (bridge/cli_errors.py).
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

import bridge
from bridge import diff as diffs
from bridge.atomic import atomic_output, check_output
from bridge.cli_errors import (
    MISMATCH,
    UsageError,
    command,
    dump,
    mismatch_line,
    report_json,
    set_debug,
    usage_failure,
)
from bridge.cli_options import convert_options, existing, modules_table, read_toml
from bridge.graph import GRAPH, Edge
from bridge.report import Report

TORCH_SUFFIXES = (".pt", ".bin", ".pth")


def _console() -> Console:
    """Rich on stdout; wide when not a terminal so that piped tables keep whole keys."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=int(os.environ.get("COLUMNS", "200")), no_color=True)


def _edge_json(edge: Edge) -> dict[str, Any]:
    return {
        "src": edge.src,
        "dst": edge.dst,
        "cost": edge.cost,
        "lossy": edge.lossy,
        "loses": edge.loses,
        "needs": sorted(edge.needs),
    }


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"  # pragma: no cover


# ---------------------------------------------------------------- the commands

EXAMPLES = """Examples:

  bridge formats

  bridge inspect model.safetensors

  bridge plan model.safetensors --to orbax --template models.py:abstract

  bridge convert model.safetensors ckpt/ --to orbax --template models:abstract

  bridge convert ckpt/ exported.safetensors --to safetensors --dtype bf16

  bridge diff model.safetensors ckpt/ --atol 1e-6
"""

app = typer.Typer(
    name="bridge",
    help="Convert model state between PyTorch, safetensors, Flax NNX / Linen, Orbax and msgpack.",
    epilog=EXAMPLES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"bridge {bridge.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of errors (on stderr).")
    ] = False,
) -> None:
    """Convert model state between PyTorch, safetensors, Flax NNX / Linen, Orbax and msgpack."""
    set_debug(debug)


JsonOpt = Annotated[bool, typer.Option("--json", help="Write JSON on stdout (for scripts).")]
SrcArg = Annotated[
    str, typer.Argument(metavar="SRC", help="The source file or checkpoint directory.")
]
ToOpt = Annotated[str, typer.Option("--to", "-t", help="The target format (see `bridge formats`).")]
TemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--template",
        help=(
            "module:factory (dotted module or .py path); factory() returns the target "
            "skeleton: an abstract NNX model, Linen variables, (linen_module, *inputs), or "
            "a torch module."
        ),
    ),
]
RulesOpt = Annotated[
    str | None,
    typer.Option(
        "--rules", help="TOML with [[rename]], [[split]], [[merge]], [[stack]], [modules]."
    ),
]
ModulesOpt = Annotated[
    str | None,
    typer.Option("--modules", help='TOML whose [modules] table maps patterns to "Conv1D", ...'),
]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="Cast floating leaves: bf16, fp16, fp32, ...")
]
CastingOpt = Annotated[
    str | None,
    typer.Option(
        "--casting",
        help="same_kind (floating to floating, the default) or unsafe: let --dtype cast "
        "to an integer or bool type (values rounded, wrapped).",
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict/--no-strict", help="Fail on any mismatch, or fill what matches."),
]

RULES_HELP = """Rules TOML (every table optional; full schema: python -m pydoc bridge.cli):

  [[rename]]   pattern = "^Dense_(\\\\d+)"   replacement = "layers.\\\\1"

  [[split]]    fused = "{p*}.qkv.{r}"   parts = ["{p*}.q.{r}", "{p*}.k.{r}"]

  [[merge]]    parts = [...]   fused = "..."   (split, merge: axis = 0)

  [[stack]]    layers = "layers.{i}.{rest*}"   stacked = "layers.{rest*}"

  [[unstack]]  stacked = "layers.{rest*}"   layers = "layers.{i}.{rest*}"

  [modules]    "\\\\.c_proj$" = "Conv1D"
"""


@app.command(
    short_help="The formats and the conversions between them.",
    epilog="Examples:\n\n  bridge formats\n\n  bridge formats --json | jq '.conversions[]'",
)
def formats(as_json: JsonOpt = False) -> None:
    """The formats bridge knows and the conversions between them."""
    with command(as_json):
        fmts = bridge.registered_formats()
        edges = bridge.conversions()
        if as_json:
            dump(
                {
                    "formats": [
                        {"name": n, "description": f.description, "options": sorted(f.options)}
                        for n, f in sorted(fmts.items())
                    ],
                    "conversions": [_edge_json(e) for e in edges],
                }
            )
            return
        console = _console()
        table = Table(title="formats")
        for column in ("name", "description", "options"):
            table.add_column(column)
        for name, fmt in sorted(fmts.items()):
            table.add_row(name, fmt.description, ", ".join(sorted(fmt.options)) or "-")
        console.print(table)
        table = Table(title="conversions")
        for column in ("edge", "cost", "lossy", "needs"):
            table.add_column(column)
        for e in sorted(edges, key=lambda e: (e.src, e.dst)):
            lossy = f"yes: {e.loses or 'drops data'}" if e.lossy else "no"
            table.add_row(f"{e.src} -> {e.dst}", f"{e.cost:g}", lossy, ", ".join(sorted(e.needs)))
        console.print(table)


def _key_parts(key: str) -> list[str]:
    return key.split("/") if "/" in key else key.split(".")


@app.command(
    short_help="Keys, shapes, dtypes and bytes; reads no data.",
    epilog="Examples:\n\n  bridge inspect model.safetensors\n\n"
    "  bridge inspect ckpt/ --json | jq '.bytes'",
)
def inspect(
    path: Annotated[str, typer.Argument(metavar="PATH", help="A file or checkpoint directory.")],
    as_json: JsonOpt = False,
    flat: Annotated[bool, typer.Option("--flat", help="A table of keys, not a tree.")] = False,
) -> None:
    """Format, keys, shapes, dtypes and bytes of a checkpoint, without reading arrays."""
    with command(as_json, path):
        found = bridge.inspect(existing(path))
        if as_json:
            dump(
                {
                    "path": path,
                    "format": found.format,
                    "arrays": len(found.rows),
                    "bytes": found.nbytes,
                    "leaves": [
                        {
                            "key": r.target,
                            "shape": list(r.shape),
                            "dtype": r.dtype,
                            "bytes": r.nbytes,
                        }
                        for r in found.rows
                    ],
                }
            )
            return
        console = _console()
        total = f"{len(found.rows)} arrays, {found.nbytes:,} bytes ({_size(found.nbytes)})"
        if flat:
            table = Table(title=f"{path} ({found.format})", caption=total)
            for column in ("key", "shape", "dtype", "bytes"):
                table.add_column(column, justify="right" if column == "bytes" else "left")
            for r in found.rows:
                table.add_row(r.target, str(r.shape), r.dtype, f"{r.nbytes:,}")
            console.print(table)
            return
        tree = Tree(f"[bold]{path}[/bold] ({found.format})")
        nodes: dict[tuple[str, ...], Tree] = {(): tree}
        for r in found.rows:
            parts = _key_parts(r.target)
            for depth in range(1, len(parts)):
                prefix = tuple(parts[:depth])
                if prefix not in nodes:
                    nodes[prefix] = nodes[prefix[:-1]].add(parts[depth - 1])
            label = f"{parts[-1]}  {r.shape} {r.dtype}  {_size(r.nbytes)}"
            nodes[tuple(parts[:-1])].add(label)
        console.print(tree)
        console.print(f"{found.format}: {total}")


def _plan_json(found: bridge.Plan) -> dict[str, Any]:
    return {
        "source": found.source,
        "target": found.target,
        "route": [_edge_json(e) for e in found.route],
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
    }


@app.command(
    short_help="The route and per-leaf table; moves no data.",
    epilog="Examples:\n\n"
    "  bridge plan model.safetensors --to orbax --template models.py:abstract\n\n"
    "  bridge plan ckpt/ --to torch --rules rules.toml --json\n\n" + RULES_HELP,
)
def plan(
    src: SrcArg,
    to: ToOpt,
    template: TemplateOpt = None,
    rules: RulesOpt = None,
    modules: ModulesOpt = None,
    dtype: DtypeOpt = None,
    casting: CastingOpt = None,
    strict: StrictOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """The route and per-leaf table a conversion would use; no data is moved.

    Exits 1 when the plan has mismatches (unless --no-strict).
    """
    with command(as_json, src) as run:
        kwargs = convert_options(template, rules, modules, dtype, casting, strict)
        kwargs.pop("progress")
        if "path" in GRAPH.format(to).options:  # satisfies the route's need; nothing is written
            kwargs["path"] = os.devnull
        found = bridge.plan(existing(src), to=to, **kwargs)
        failed = strict and not found.report.ok
        if as_json and not failed:
            dump(_plan_json(found))
        elif not as_json:
            console = _console()
            hops = " ; ".join(str(e) for e in found.route) or "(same format)"
            console.print(f"plan {found.source} -> {found.target}: {hops}", highlight=False)
            table = Table(
                caption=f"{len(found.rows)} leaves, {found.nbytes:,} bytes ({_size(found.nbytes)})"
            )
            for column in ("source", "target", "transform", "shape", "dtype", "bytes"):
                table.add_column(column, justify="right" if column == "bytes" else "left")
            for r in found.rows:
                table.add_row(
                    r.source or "(none)",
                    r.target,
                    r.transform or "-",
                    str(r.shape),
                    r.dtype,
                    f"{r.nbytes:,}",
                )
            console.print(table)
            console.print(str(found.report), markup=False, highlight=False)
        if failed:
            run.fail(mismatch_line(found.report), MISMATCH, "MismatchError", _plan_json(found))


def _save_torch(state: dict[str, Any], dst: str, overwrite: bool) -> pathlib.Path:
    import torch

    with atomic_output(dst, overwrite=overwrite) as temp:
        torch.save(state, temp)
    return pathlib.Path(dst)


@app.command(
    short_help="Convert SRC to a format and write it at DST.",
    epilog="Examples:\n\n"
    "  bridge convert model.safetensors ckpt/ --to orbax --template models.py:abstract\n\n"
    "  bridge convert ckpt/ model.safetensors --to safetensors --dtype bf16 --overwrite\n\n"
    "  bridge convert ckpt/ model.pt --to torch --template models.py:torch_model\n\n" + RULES_HELP,
)
def convert(
    src: SrcArg,
    dst: Annotated[str, typer.Argument(metavar="DST", help="The output file or directory.")],
    to: ToOpt,
    template: TemplateOpt = None,
    rules: RulesOpt = None,
    modules: ModulesOpt = None,
    dtype: DtypeOpt = None,
    casting: CastingOpt = None,
    strict: StrictOpt = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace DST if it exists.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert SRC to format --to and write it at DST (atomically).

    File formats only: safetensors, orbax, msgpack, or torch with a .pt/.bin/.pth DST.
    """
    with command(as_json, src, output=dst):
        source = existing(src)
        fmt = GRAPH.format(to)
        torch_file = to == "torch"
        if torch_file and not dst.endswith(TORCH_SUFFIXES):
            raise UsageError(f"--to torch writes a .pt/.bin/.pth file, not {dst!r}")
        if not torch_file and "path" not in fmt.options:
            writable = sorted(
                n for n, f in bridge.registered_formats().items() if "path" in f.options
            )
            raise UsageError(
                f"--to {to} is an in-memory format; convert writes {', '.join(writable)}"
                " or torch (.pt)"
            )
        if torch_file:  # refused before converting, as the writers of other formats do
            check_output(dst, overwrite=overwrite)
        kwargs = convert_options(template, rules, modules, dtype, casting, strict)
        if not torch_file:
            kwargs.update(path=dst, overwrite=overwrite)
        result = bridge.convert(source, to=to, **kwargs)
        result, report = result if not strict else (result, Report())
        written = _save_torch(result, dst, overwrite) if torch_file else pathlib.Path(dst)
        found = bridge.inspect(written)
        if as_json:
            dump(
                {
                    "source": src,
                    "source_format": bridge.detect(source),
                    "target": to,
                    "path": str(written),
                    "arrays": len(found.rows),
                    "bytes": found.nbytes,
                    "report": report_json(report),
                }
            )
            return
        summary = f"{len(found.rows)} arrays, {_size(found.nbytes)}"
        print(f"wrote {written} ({to}): {summary}")
        if not strict:
            print(str(report))


@app.command(
    short_help="What differs between two states (exit 1 if any).",
    epilog="Examples:\n\n  bridge diff model.safetensors exported.safetensors\n\n"
    "  bridge diff model.safetensors ckpt/ --atol 1e-6 --json\n\n"
    "Keys are compared independently of spelling (layers.0 meets layers_0); a Flax-side "
    "file (orbax, msgpack) compared with a torch-side one (torch, safetensors) is first "
    "converted to a torch state_dict.",
)
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="The first file or checkpoint.")],
    b: Annotated[str, typer.Argument(metavar="B", help="The second file or checkpoint.")],
    rtol: Annotated[float | None, typer.Option("--rtol", help="Relative tolerance.")] = None,
    atol: Annotated[float | None, typer.Option("--atol", help="Absolute tolerance.")] = None,
    exact: Annotated[
        bool, typer.Option("--exact", help="Compare bits: NaN payloads and -0.0 count.")
    ] = False,
    modules: ModulesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Keys, shapes, dtypes and values that differ between two states; exit 1 if any.

    Values are compared as numbers, equal unless --rtol / --atol are given (NaN equals
    NaN, -0.0 equals 0.0), or with --exact bit for bit.
    """
    with command(as_json, a) as run:
        if exact and (rtol is not None or atol is not None):
            raise UsageError("--exact compares bits; it takes no --rtol / --atol")
        comparison = diffs.Comparison(exact, rtol or 0.0, atol or 0.0)
        table = modules_table(read_toml(modules), modules) if modules else None
        fmt_a, left = diffs.read(existing(a), existing(b), table)
        run.path = b
        fmt_b, right = diffs.read(b, a, table)
        run.path = None  # what follows is about both
        found = diffs.compare(left, right, comparison)
        document = {
            "a": {"path": a, "format": fmt_a, "arrays": len(left)},
            "b": {"path": b, "format": fmt_b, "arrays": len(right)},
            "comparison": comparison.to_json(),
            "equal": found.equal,
            "only_a": found.only_a,
            "only_b": found.only_b,
            "shape": found.shapes,
            "dtype": found.dtypes,
            "values": found.values,
        }
        if found.equal and as_json:
            dump(document)
        elif found.equal:
            print(f"equal: {len(left)} arrays ({fmt_a} {a} == {fmt_b} {b}), values {comparison}")
        else:
            if not as_json:
                _console().print(_diff_table(f"{a} ({fmt_a}) vs {b} ({fmt_b})", found))
            message = f"{a} and {b} differ, values {comparison}: {found.summary()}"
            run.fail(message, MISMATCH, "Differences", document)


def _diff_table(title: str, found: diffs.Diff) -> Table:
    table = Table(title=title, caption=f"values compared {found.comparison}")
    for column in ("key", "difference", "a", "b"):
        table.add_column(column)
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
    return table


def main() -> None:
    """The console script's entry point: the exit status of the contract (cli_errors)."""
    try:
        status = app(prog_name="bridge", standalone_mode=False)
    except typer.TyperException as error:  # a command line that does not parse
        status = usage_failure(error, sys.argv[1:])
    sys.exit(status or 0)


if __name__ == "__main__":
    main()
