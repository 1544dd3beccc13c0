r"""The `bridge` command: look into checkpoints, plan and run conversions, compare states.

    bridge formats                                   the formats and the conversions between them
    bridge inspect PATH [--json]                     keys, shapes, dtypes and bytes, no array data
    bridge plan SRC --to FORMAT [...] [--json]       the route and per-leaf table, no data moved
    bridge convert SRC DST --to FORMAT [...]         convert and write DST
    bridge diff A B [--rtol R --atol A] [--json]     what differs between two states, any formats

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
- `plan --suggest-rules FILE.toml`: when the names of SRC and the template differ, the
  rules proposed from their structure, written to FILE for review (`--rules`: hints).
- `--dtype bf16|fp16|fp32|...`: cast floating-point leaves.
- `--no-strict`: fill what matches and report the rest instead of failing.

Exit status: 0 success; 1 a mismatch (convert, strict plan) or a difference (diff);
2 a usage or input error. Errors are one line on stderr; `--debug` adds the traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import pathlib
import sys
import traceback
from collections.abc import Iterator
from typing import Annotated, Any

import flax.linen as nn
import jax
import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

import bridge
from bridge.atomic import atomic_output, check_output
from bridge.errors import BridgeError, MismatchError, OutputExistsError
from bridge.graph import GRAPH, Context, Edge
from bridge.mapping import Report
from bridge.rules_file import modules_table, read_rules, read_toml
from bridge.tree import match_key

TORCH_SUFFIXES = (".pt", ".bin", ".pth")
TORCH_SIDE = frozenset({"torch", "safetensors"})
DTYPES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
}

_STATE = {"debug": False}


class UsageError(Exception):
    """A bad option value or input path: exit 2 with a one-line message."""


def _console() -> Console:
    """Rich on stdout; wide when not a terminal so that piped tables keep whole keys."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=int(os.environ.get("COLUMNS", "200")), no_color=True)


def _err(message: str) -> None:
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    print(f"bridge: error: {text}", file=sys.stderr)


def _mismatch_line(report: Report) -> str:
    parts = []
    for title, items in (
        ("missing", report.missing),
        ("unexpected", report.unexpected),
        ("mismatched", report.mismatched),
        ("ambiguous", report.ambiguous),
    ):
        if items:
            more = f" and {len(items) - 1} more" if len(items) > 1 else ""
            parts.append(f"{len(items)} {title} ({items[0]}{more})")
    subject = f"{report.subject}: " if report.subject else ""
    return f"mismatch: {subject}{'; '.join(parts)}; run `bridge plan ... --no-strict` for all"


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn failures into one line on stderr and an exit status (1 mismatch, 2 input)."""
    try:
        yield
    except (typer.Exit, BrokenPipeError):  # click quiets a closed pipe (`| head`) itself
        raise
    except MismatchError as error:
        if _STATE["debug"]:
            traceback.print_exc()
        _err(_mismatch_line(error.report))
        raise typer.Exit(1) from None
    except (
        BridgeError,
        UsageError,
        OSError,
        ValueError,
        TypeError,
        ImportError,
        AttributeError,
    ) as error:
        if _STATE["debug"]:
            traceback.print_exc()
        message = str(error) or type(error).__name__
        if isinstance(error, OutputExistsError):
            message = message.replace("overwrite=True", "--overwrite")
        elif isinstance(error, FileNotFoundError) and error.filename:
            message = f"no such file or directory: {error.filename!r}"
        _err(message)
        raise typer.Exit(2) from None


def _existing(path: str) -> str:
    """`path`, or a usage error if there is nothing there."""
    if not os.path.exists(path):
        raise UsageError(f"no such file or directory: {path!r}")
    return path


def _edge_json(edge: Edge) -> dict[str, Any]:
    return {
        "src": edge.src,
        "dst": edge.dst,
        "cost": edge.cost,
        "lossy": edge.lossy,
        "loses": edge.loses,
        "needs": sorted(edge.needs),
    }


def _report_json(report: Report) -> dict[str, Any]:
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


def _dump(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"  # pragma: no cover


# ---------------------------------------------------------------- option parsing


def load_template(spec: str) -> Any:
    """`module:factory` -> `factory()`; `module` is a dotted name or a `.py` path."""
    explicit = ":" in spec  # module:factory is called; a bare module's `template` is not
    module_name, _, attr = spec.rpartition(":") if explicit else (spec, "", "template")
    if not module_name:
        raise UsageError(f"--template {spec!r}: expected module:factory")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        file = pathlib.Path(_existing(module_name)).resolve()
        loaded = importlib.util.spec_from_file_location(f"_bridge_template_{file.stem}", file)
        if loaded is None or loaded.loader is None:
            raise UsageError(f"--template: cannot import {str(file)!r}")
        module = importlib.util.module_from_spec(loaded)
        sys.modules[loaded.name] = module
        sys.path.insert(0, str(file.parent))
        loaded.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UsageError(f"--template {spec!r}: {error}") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise UsageError(f"--template: module {module_name!r} has no {attr!r}") from None
    template = factory() if explicit else factory
    if isinstance(template, nn.Module):
        raise UsageError(
            f"--template {spec!r}: a Linen module needs sample inputs to give its variables' "
            "shapes: return (module, *inputs), e.g. (Model(), jax.ShapeDtypeStruct(...))"
        )
    if isinstance(template, tuple) and template and isinstance(template[0], nn.Module):
        return abstract_linen_variables(spec, *template)
    return template


def abstract_linen_variables(spec: str, module: nn.Module, *inputs: Any) -> Any:
    """The variables `module.init(key, *inputs)` would make, as shapes and dtypes only.

    Array-like inputs (arrays, `jax.ShapeDtypeStruct`s) are traced; others (flags such as
    `train=False`) are passed as they are; a trailing dict holds keyword arguments."""
    kwargs = inputs[-1] if inputs and isinstance(inputs[-1], dict) else {}
    positional = list(inputs[: len(inputs) - bool(kwargs)])
    traced = [i for i, x in enumerate(positional) if hasattr(x, "shape") and hasattr(x, "dtype")]

    def init(*arrays: Any) -> Any:
        args = list(positional)
        for index, array in zip(traced, arrays, strict=True):
            args[index] = array
        return module.init(jax.random.key(0), *args, **kwargs)

    try:
        return jax.eval_shape(init, *(positional[i] for i in traced))
    except Exception as error:  # whatever the module's own code raises on these inputs
        raise UsageError(
            f"--template {spec!r}: {type(module).__name__}.init on the sample inputs "
            f"failed: {type(error).__name__}: {error}"
        ) from error


def _options(
    template: str | None,
    rules: str | None,
    modules: str | None,
    dtype: str | None,
    strict: bool,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"strict": strict, "progress": None}
    if template is not None:
        kwargs["template"] = load_template(template)
    found_modules: dict[str, str] = {}
    if rules is not None:
        kwargs["rules"], found_modules = read_rules(_existing(rules))
    if modules is not None:
        found_modules.update(modules_table(read_toml(_existing(modules)), modules))
    if found_modules:
        kwargs["modules"] = found_modules
    if dtype is not None:
        kwargs["dtype"] = parse_dtype(dtype)
    return kwargs


def parse_dtype(name: str) -> Any:
    import jax.numpy as jnp

    try:
        return np.dtype(jnp.dtype(DTYPES.get(name.lower(), name.lower())))
    except TypeError:
        raise UsageError(
            f"--dtype {name!r}: not a dtype; try bf16, fp16, fp32 or a numpy name"
        ) from None


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
    _STATE["debug"] = debug


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
    with _errors():
        fmts = bridge.formats()
        edges = bridge.conversions()
        if as_json:
            _dump(
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
    with _errors():
        found = bridge.inspect(_existing(path))
        if as_json:
            _dump(
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
        "report": _report_json(found.report),
        **({"suggestion": _suggestion_json(found.suggestion)} if found.suggestion else {}),
    }


def _suggestion_json(found: bridge.Suggestion) -> dict[str, Any]:
    return {
        "pairings": [dataclasses.asdict(p) | {"confidence": p.confidence} for p in found.pairings],
        "ties": [dataclasses.asdict(tie) for tie in found.ties],
        "evidence": found.counts(),
        "rules_toml": found.to_toml(),
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
    strict: StrictOpt = True,
    as_json: JsonOpt = False,
    suggest: Annotated[
        str | None,
        typer.Option(
            "--suggest-rules",
            metavar="FILE",
            help="Suggest the rules from the structure of SRC and --template, write them "
            "to FILE (a new rules TOML, to review and pass with --rules); --rules are hints.",
        ),
    ] = None,
) -> None:
    """The route and per-leaf table a conversion would use; no data is moved.

    Exits 1 when the plan has mismatches (unless --no-strict).
    """
    with _errors():
        kwargs = _options(template, rules, modules, dtype, strict)
        kwargs.pop("progress")
        if "path" in GRAPH.format(to).options:  # satisfies the route's need; nothing is written
            kwargs["path"] = os.devnull
        if suggest is not None:
            kwargs["hints"], kwargs["rules"] = kwargs.pop("rules", None), "auto"
        found = bridge.plan(_existing(src), to=to, **kwargs)
        if found.suggestion is not None and suggest is not None:
            with atomic_output(suggest) as temp:
                pathlib.Path(temp).write_text(found.suggestion.to_toml(), encoding="utf-8")
        if as_json:
            _dump(_plan_json(found))
        else:
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
            if found.suggestion is not None:
                console.print(str(found.suggestion), markup=False, highlight=False)
            console.print(str(found.report), markup=False, highlight=False)
        if strict and not found.report.ok:
            _err(_mismatch_line(found.report))
            raise typer.Exit(1)


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
    strict: StrictOpt = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace DST if it exists.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert SRC to format --to and write it at DST (atomically).

    File formats only: safetensors, orbax, msgpack, or torch with a .pt/.bin/.pth DST.
    """
    with _errors():
        source = _existing(src)
        fmt = GRAPH.format(to)
        torch_file = to == "torch"
        if torch_file and not dst.endswith(TORCH_SUFFIXES):
            raise UsageError(f"--to torch writes a .pt/.bin/.pth file, not {dst!r}")
        if not torch_file and "path" not in fmt.options:
            writable = sorted(n for n, f in bridge.formats().items() if "path" in f.options)
            raise UsageError(
                f"--to {to} is an in-memory format; convert writes {', '.join(writable)}"
                " or torch (.pt)"
            )
        if torch_file:  # refused before converting, as the writers of other formats do
            check_output(dst, overwrite=overwrite)
        kwargs = _options(template, rules, modules, dtype, strict)
        if not torch_file:
            kwargs.update(path=dst, overwrite=overwrite)
        result = bridge.convert(source, to=to, **kwargs)
        result, report = result if not strict else (result, Report())
        written = _save_torch(result, dst, overwrite) if torch_file else pathlib.Path(dst)
        found = bridge.inspect(written)
        if as_json:
            _dump(
                {
                    "source": src,
                    "source_format": bridge.detect(source),
                    "target": to,
                    "path": str(written),
                    "arrays": len(found.rows),
                    "bytes": found.nbytes,
                    "report": _report_json(report),
                }
            )
            return
        summary = f"{len(found.rows)} arrays, {_size(found.nbytes)}"
        print(f"wrote {written} ({to}): {summary}")
        if not strict:
            print(str(report))


def _read_flat(path: str, other: str, modules: dict[str, str] | None) -> tuple[str, dict]:
    """`{match_key: leaf}` of a file; a Flax-side file meeting a torch-side one is
    converted to a torch state_dict first (Flax roles make that direction unambiguous),
    so that layouts and names meet."""
    obj: Any = _existing(path)
    name = fmt = bridge.detect(obj)
    if name not in TORCH_SIDE and bridge.detect(_existing(other)) in TORCH_SIDE:
        kwargs = {"modules": modules} if modules else {}
        obj, fmt = bridge.convert(obj, to="torch", **kwargs), "torch"
    flat = GRAPH.format(fmt).read(obj, Context(source=fmt))
    return name, {match_key(key): leaf for key, leaf in flat.items() if not leaf.transient}


def _compare(a: Any, b: Any, rtol: float, atol: float) -> tuple[bool, float]:
    x, y = np.asarray(a), np.asarray(b)
    if x.dtype.kind in "fc" or y.dtype.kind in "fc" or x.dtype != y.dtype:
        x64 = x.astype(np.complex128 if x.dtype.kind == "c" else np.float64)
        y64 = y.astype(np.complex128 if y.dtype.kind == "c" else np.float64)
        if rtol == 0 and atol == 0:
            same = bool(np.array_equal(x64, y64, equal_nan=True))
        else:
            same = bool(np.allclose(x64, y64, rtol=rtol, atol=atol, equal_nan=True))
        with np.errstate(invalid="ignore"):
            gap = float(np.nanmax(np.abs(x64 - y64))) if x64.size else 0.0
        return same, gap
    same = bool(np.array_equal(x, y))
    gap = 0.0 if same else float(np.max(np.abs(x.astype(np.int64) - y.astype(np.int64))))
    return same, gap


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
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance.")] = 0.0,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance.")] = 0.0,
    modules: ModulesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Keys, shapes, dtypes and values that differ between two states; exit 1 if any.

    Values must be equal exactly unless --rtol / --atol are given.
    """
    with _errors():
        table = modules_table(read_toml(_existing(modules)), modules) if modules else None
        fmt_a, left = _read_flat(a, b, table)
        fmt_b, right = _read_flat(b, a, table)
        only_a = sorted(set(left) - set(right))
        only_b = sorted(set(right) - set(left))
        shapes, dtypes, values = [], [], []
        for key in sorted(set(left) & set(right)):
            x, y = left[key], right[key]
            if x.shape != y.shape:
                shapes.append({"key": key, "a": list(x.shape), "b": list(y.shape)})
                continue
            if str(x.dtype) != str(y.dtype):
                dtypes.append({"key": key, "a": str(x.dtype), "b": str(y.dtype)})
            same, gap = _compare(x.value, y.value, rtol, atol)
            if not same:
                values.append({"key": key, "max_abs_diff": gap})
        equal = not (only_a or only_b or shapes or dtypes or values)
        if as_json:
            _dump(
                {
                    "a": {"path": a, "format": fmt_a, "arrays": len(left)},
                    "b": {"path": b, "format": fmt_b, "arrays": len(right)},
                    "equal": equal,
                    "only_a": only_a,
                    "only_b": only_b,
                    "shape": shapes,
                    "dtype": dtypes,
                    "values": values,
                }
            )
        else:
            console = _console()
            if equal:
                console.print(f"equal: {len(left)} arrays ({fmt_a} {a} == {fmt_b} {b})")
            else:
                out = Table(title=f"{a} ({fmt_a}) vs {b} ({fmt_b})")
                for column in ("key", "difference", "a", "b"):
                    out.add_column(column)
                for key in only_a:
                    out.add_row(key, "only in a", "present", "-")
                for key in only_b:
                    out.add_row(key, "only in b", "-", "present")
                for row in shapes:
                    out.add_row(row["key"], "shape", str(tuple(row["a"])), str(tuple(row["b"])))
                for row in dtypes:
                    out.add_row(row["key"], "dtype", row["a"], row["b"])
                for row in values:
                    out.add_row(row["key"], f"values (max |a-b| {row['max_abs_diff']:.3g})", "", "")
                console.print(out)
        if not equal:
            raise typer.Exit(1)


def main() -> None:
    """The console script's entry point."""
    app(prog_name="bridge")


if __name__ == "__main__":
    main()
