"""How the `bridge` command fails, every time: one line on stderr, exit status 2 (usage
or input) or 1 (a mismatch or a difference), no traceback unless `--debug`; with
`--json`, stdout holds one JSON document, also on error:
`{"error": {"type": ..., "message": ..., "path": ...}}`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import traceback
from collections.abc import Iterator
from typing import Any, NoReturn

import typer

from bridge.cli_output import dump, report_json
from bridge.errors import BridgeError, MismatchError, OutputExistsError
from bridge.report import Report

USAGE, MISMATCH = 2, 1
"""Exit statuses: a usage or input error; a mismatch (or a difference, for diff)."""

API_SPELLINGS = {
    "overwrite=True": "--overwrite",
    "casting='unsafe'": "--casting unsafe",
    "rules=...": "--rules FILE",
}
"""Options named in the library's messages, and the flags that set them."""

DEBUG = {"on": False}
"""Set by `--debug`: errors show their traceback (on stderr) before their line."""


def set_debug(on: bool) -> None:
    """`--debug`: tracebacks of errors, and the logs of the libraries underneath (Orbax
    logs its failures through absl), which would otherwise add lines to an error's one."""
    DEBUG["on"] = on
    if not on:
        logging.getLogger("absl").setLevel(logging.CRITICAL)


class UsageError(Exception):
    """A bad option value or input path: exit 2 with a one-line message about `path`."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())


def mismatch_line(report: Report) -> str:
    """A report in one line: the count of each kind of problem and the first of each."""
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


@dataclasses.dataclass
class Run:
    """One command's run: whether it answers in JSON, the file it reads now (an error
    that names no file of its own is about that one) and the output it writes."""

    as_json: bool = False
    path: str | None = None
    output: str | None = None

    def fail(
        self,
        message: str,
        code: int,
        kind: str,
        document: dict[str, Any] | None = None,
        **extra: Any,
    ) -> NoReturn:
        """Print the one line (and the JSON document, with `error` in it) and exit `code`."""
        line = one_line(message)
        if self.as_json:
            error = {"type": kind, "message": line, "path": self.path, **extra}
            dump({**(document or {}), "error": error})
        print(f"bridge: error: {line}", file=sys.stderr)
        raise typer.Exit(code)

    def fail_with(self, error: BaseException) -> NoReturn:
        """`fail` for an exception: its class, its message in CLI spelling, its file."""
        if DEBUG["on"]:
            traceback.print_exception(error)
        if isinstance(error, MismatchError):
            extra = {"report": report_json(error.report)}
            self.fail(mismatch_line(error.report), MISMATCH, "MismatchError", **extra)
        message = str(error) or type(error).__name__
        for api, flag in API_SPELLINGS.items():
            message = message.replace(api, flag)
        if isinstance(error, FileNotFoundError) and error.filename:
            message = f"no such file or directory: {error.filename!r}"
        elif not isinstance(error, BridgeError | UsageError | OSError):
            message = f"{type(error).__name__}: {message}"  # not ours: say what it is
        if isinstance(error, UsageError):
            self.path = error.path
        elif isinstance(error, OutputExistsError):
            self.path = self.output or self.path
        elif path := getattr(error, "path", None) or getattr(error, "filename", None):
            self.path = str(path)
        self.fail(message, USAGE, type(error).__name__)


@contextlib.contextmanager
def command(
    as_json: bool = False, path: str | None = None, output: str | None = None
) -> Iterator[Run]:
    """Run a command's body; whatever it raises ends as the contract says."""
    run = Run(as_json, path, output)
    try:
        yield run
    except (typer.Exit, BrokenPipeError):  # click quiets a closed pipe (`| head`) itself
        raise
    except Exception as error:  # the contract: no failure escapes as a traceback
        run.fail_with(error)


def usage_failure(error: typer.TyperException, argv: list[str]) -> int:
    """A command line typer could not parse: one line naming the help to read."""
    if type(error).__name__ == "NoArgsIsHelpError":  # not exported by typer
        print(error.format_message())  # `bridge` alone: the commands, then the one line
        message = "no command given"
    else:
        where = error.ctx.command_path if getattr(error, "ctx", None) else "bridge"
        message = f"{error.format_message()} (see `{where} -h`)"
    with contextlib.suppress(typer.Exit):
        Run(as_json="--json" in argv).fail(message, USAGE, "UsageError")
    return USAGE
