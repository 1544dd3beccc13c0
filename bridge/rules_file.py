"""The rules TOML file (`bridge plan/convert --rules`) written: the schema is in
`bridge.cli`'s docstring, the reader in `bridge.cli_options`. Written files read back as
the same rules, in the order the reader applies them (renames, splits, merges, unstacks;
stacks after layout)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

from bridge.mapping import Merge, Rule, Split, Stack, Unstack

_ORDER = [tuple, Split, Merge, Unstack, Stack]


def _kind(rule: Rule) -> type:
    return tuple if isinstance(rule, tuple | list) else type(rule)


def in_file_order(rules: Sequence[Rule]) -> list[Rule]:
    """`rules` in the order `cli_options.load_rules` gives them back (each kind in order)."""
    return sorted(rules, key=lambda rule: _ORDER.index(_kind(rule)))


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def _table(rule: Rule) -> list[str]:
    if _kind(rule) is tuple:
        pattern, replacement = rule  # type: ignore[misc]
        return [
            "[[rename]]",
            f"pattern = {_quote(pattern)}",
            f"replacement = {_quote(replacement)}",
        ]
    lines = [f"[[{type(rule).__name__.lower()}]]"]
    for key, value in dataclasses.asdict(rule).items():  # type: ignore[call-overload]
        if isinstance(value, str):
            lines.append(f"{key} = {_quote(value)}")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = [{', '.join(_quote(part) for part in value)}]")
    return lines


def format_rules(
    rules: Sequence[Rule], modules: Mapping[str, str], comments: Sequence[str] = ()
) -> str:
    """A rules TOML file that `cli_options.load_rules` reads back as `in_file_order(rules)` and
    `modules`; `comments` head it, one `#` line each."""
    lines = [f"# {comment}" for comment in comments]
    for rule in in_file_order(rules):
        lines += ["", *_table(rule)]
    if modules:
        lines += ["", "[modules]", *(f"{_quote(k)} = {_quote(v)}" for k, v in modules.items())]
    return "\n".join(lines) + "\n"
