"""The rules TOML file (`bridge plan/convert --rules`), read and written: the schema is in
`bridge.cli`'s docstring. Written files read back as the same rules, in the order the
reader applies them (renames, splits, merges, unstacks; stacks after layout)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from bridge.errors import FormatError
from bridge.mapping import Merge, Rule, Split, Stack, Unstack

RULE_FIELDS: dict[str, tuple[type, set[str], set[str]]] = {
    "split": (Split, {"fused", "parts"}, {"axis"}),
    "merge": (Merge, {"parts", "fused"}, {"axis"}),
    "unstack": (Unstack, {"stacked", "layers"}, {"over", "axis"}),
    "stack": (Stack, {"layers", "stacked"}, {"over", "axis"}),
}


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise FormatError(f"{path}: invalid TOML: {error}") from None


def read_rules(path: str) -> tuple[list[Rule], dict[str, str]]:
    """The rules and the `[modules]` table of a rules TOML file."""
    data = read_toml(path)
    known = {"rename", "modules", *RULE_FIELDS}
    if unknown := sorted(set(data) - known):
        raise FormatError(f"{path}: unknown table(s) {unknown}; known: {sorted(known)}")
    rules: list[Rule] = []
    for i, entry in enumerate(data.get("rename", [])):
        if not isinstance(entry, dict) or set(entry) != {"pattern", "replacement"}:
            raise FormatError(f"{path}: [[rename]] #{i + 1} needs exactly pattern and replacement")
        rules.append((str(entry["pattern"]), str(entry["replacement"])))
    for name, (cls, required, optional) in RULE_FIELDS.items():
        for i, entry in enumerate(data.get(name, [])):
            keys = set(entry) if isinstance(entry, dict) else set()
            if not required <= keys or keys - required - optional:
                raise FormatError(
                    f"{path}: [[{name}]] #{i + 1} needs {sorted(required)}"
                    f" (optional {sorted(optional)}), got {sorted(keys)}"
                )
            rules.append(cls(**entry))
    return rules, modules_table(data, path)


def modules_table(data: dict[str, Any], path: str) -> dict[str, str]:
    """The `[modules]` table of a TOML file (or its top-level string entries)."""
    table = data.get("modules")
    if table is None:
        table = {k: v for k, v in data.items() if isinstance(v, str)}
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise FormatError(f'{path}: [modules] must map patterns to family names ("Conv1D")')
    return dict(table)


_ORDER = [tuple, Split, Merge, Unstack, Stack]


def _kind(rule: Rule) -> type:
    return tuple if isinstance(rule, tuple | list) else type(rule)


def in_file_order(rules: Sequence[Rule]) -> list[Rule]:
    """`rules` in the order `read_rules` gives them back (each kind in its given order)."""
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
    """A rules TOML file that `read_rules` reads back as `in_file_order(rules)` and
    `modules`; `comments` head it, one `#` line each."""
    lines = [f"# {comment}" for comment in comments]
    for rule in in_file_order(rules):
        lines += ["", *_table(rule)]
    if modules:
        lines += ["", "[modules]", *(f"{_quote(k)} = {_quote(v)}" for k, v in modules.items())]
    return "\n".join(lines) + "\n"
