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
- `plan --suggest-rules FILE.toml`: when the names of SRC and the template differ, the
  rules proposed from their structure, written to FILE for review (`--rules`: hints).
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
from typing import Annotated

import typer

import bridge
from bridge import cli_output as output
from bridge import diff as diffs
from bridge.atomic import atomic_output
from bridge.cli_errors import MISMATCH, UsageError, command, mismatch_line, set_debug, usage_failure
from bridge.cli_options import convert_options, existing, modules_table, read_toml
from bridge.formats.torch import SUFFIXES as TORCH_SUFFIXES
from bridge.graph import GRAPH
from bridge.report import Report

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
        bool,
        typer.Option(
            "--debug", help="Show the tracebacks of errors, and Orbax's logs (on stderr)."
        ),
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
        formats, edges = bridge.registered_formats(), bridge.conversions()
        if as_json:
            output.dump(output.formats_json(formats, edges))
        else:
            output.print_formats(formats, edges)


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
            output.dump(output.inspection_json(path, found))
        else:
            output.print_inspection(path, found, flat)


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
    with command(as_json, src) as run:
        kwargs = convert_options(template, rules, modules, dtype, casting, strict)
        kwargs.pop("progress")
        if "path" in GRAPH.format(to).options:  # satisfies the route's need; nothing is written
            kwargs["path"] = os.devnull
        if suggest is not None:
            kwargs["hints"], kwargs["rules"] = kwargs.pop("rules", None), "auto"
        found = bridge.plan(existing(src), to=to, **kwargs)
        if found.suggestion is not None and suggest is not None:
            with atomic_output(suggest) as temp:
                pathlib.Path(temp).write_text(found.suggestion.to_toml(), encoding="utf-8")
        failed = strict and not found.report.ok
        if as_json and not failed:
            output.dump(output.plan_json(found))
        elif not as_json:
            output.print_plan(found)
        if failed:
            document = output.plan_json(found)
            run.fail(mismatch_line(found.report), MISMATCH, "MismatchError", document)


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
    batch_size: Annotated[
        str | None,
        typer.Option("--batch-size", help="Bytes held at once converting a file: 64MB, 1GB."),
    ] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            "--max-shard-size", help="safetensors: shards of at most this size (5GB) in DST/."
        ),
    ] = None,
    no_config: Annotated[
        bool,
        typer.Option(
            "--no-config", help="safetensors: no config.json from a transformers template."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert SRC to format --to and write it at DST (atomically).

    File formats only: safetensors, orbax, msgpack, or torch with a .pt/.bin/.pth DST.
    Between files the data streams in batches (default 64 MiB).
    """
    with command(as_json, src, output=dst):
        source = existing(src)
        if "path" not in GRAPH.format(to).options:
            writable = sorted(
                n for n, f in bridge.registered_formats().items() if "path" in f.options
            )
            raise UsageError(
                f"--to {to} is an in-memory format; convert writes {', '.join(writable)}"
            )
        if to == "torch" and not dst.endswith(TORCH_SUFFIXES):
            raise UsageError(f"--to torch writes a .pt/.bin/.pth file, not {dst!r}")
        kwargs = convert_options(template, rules, modules, dtype, casting, strict)
        kwargs.update(path=dst, overwrite=overwrite)
        if batch_size is not None:
            kwargs["batch_bytes"] = batch_size
        for flag, name, value in (
            ("--max-shard-size", "max_shard_size", max_shard_size),
            ("--no-config", "config", False if no_config else None),
        ):
            if value is not None:
                if to != "safetensors":
                    raise UsageError(f"{flag} is for --to safetensors, not --to {to}")
                kwargs[name] = value
        result = bridge.convert(source, to=to, **kwargs)
        result, report = result if not strict else (result, Report())
        written = pathlib.Path(dst)
        found = bridge.inspect(written)
        if as_json:
            output.dump(
                {
                    "source": src,
                    "source_format": bridge.detect(source),
                    "target": to,
                    "path": str(written),
                    "arrays": len(found.rows),
                    "bytes": found.nbytes,
                    "report": output.report_json(report),
                }
            )
            return
        summary = f"{len(found.rows)} arrays, {output.size(found.nbytes)}"
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
        fmt_a = bridge.detect(existing(a))
        run.path = b  # errors from here on are about b, until it is read
        fmt_b = bridge.detect(existing(b))
        run.path = a
        left = diffs.read(a, fmt_a, fmt_b, table)
        run.path = b
        right = diffs.read(b, fmt_b, fmt_a, table)
        run.path = None  # what follows is about both
        found = diffs.compare(left, right, comparison)
        sides = {"a": (a, fmt_a, len(left)), "b": (b, fmt_b, len(right))}
        if found.equal and as_json:
            output.dump(output.diff_json(sides, found))
        elif found.equal:
            print(f"equal: {len(left)} arrays ({fmt_a} {a} == {fmt_b} {b}), values {comparison}")
        else:
            if not as_json:
                output.print_diff(f"{a} ({fmt_a}) vs {b} ({fmt_b})", found)
            message = f"{a} and {b} differ, values {comparison}: {found.summary()}"
            run.fail(message, MISMATCH, "Differences", output.diff_json(sides, found))


def main() -> None:
    """The console script's entry point: the exit status of the contract (cli_errors)."""
    try:
        status = app(prog_name="bridge", standalone_mode=False)
    except typer.TyperException as error:  # a command line that does not parse
        status = usage_failure(error, sys.argv[1:])
    sys.exit(status or 0)


if __name__ == "__main__":
    main()
