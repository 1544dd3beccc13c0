"""The `bridge` command's option values made into `convert` arguments: `--template`
(a factory the user wrote), `--rules` / `--modules` (TOML files), `--dtype` and
`--casting`. Whatever is wrong in them is a `UsageError` naming the option and file."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import re
import sys
import tomllib
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from bridge.cli_errors import UsageError
from bridge.mapping import Merge, Split, Stack, Unstack
from bridge.tree import CASTINGS

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


def existing(path: str) -> str:
    """`path`, or a usage error if there is nothing there."""
    if not os.path.exists(path):
        raise UsageError(f"no such file or directory: {path!r}", path)
    return path


def _user_code(spec: str, what: str, path: str | None, call: Any, *args: Any) -> Any:
    """`call(*args)` of the user's template module; what it raises is a usage error
    naming it (its traceback with `--debug`)."""
    try:
        return call(*args)
    except Exception as error:
        raise UsageError(
            f"--template {spec!r}: {what} failed: {type(error).__name__}: {error}", path
        ) from error


def load_template(spec: str) -> Any:
    """`module:factory` -> `factory()`; `module` is a dotted name or a `.py` path."""
    explicit = ":" in spec  # module:factory is called; a bare module's `template` is not
    module_name, _, attr = spec.rpartition(":") if explicit else (spec, "", "template")
    if not module_name:
        raise UsageError(f"--template {spec!r}: expected module:factory")
    file: str | None = None
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        file = str(pathlib.Path(existing(module_name)).resolve())
        loaded = importlib.util.spec_from_file_location(
            f"_bridge_template_{pathlib.Path(file).stem}", file
        )
        if loaded is None or loaded.loader is None:
            raise UsageError(f"--template: cannot import {file!r}", file)
        module = importlib.util.module_from_spec(loaded)
        sys.modules[loaded.name] = module
        sys.path.insert(0, os.path.dirname(file))
        _user_code(spec, f"importing {module_name}", file, loaded.loader.exec_module, module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = _user_code(
            spec, f"importing {module_name}", None, importlib.import_module, module_name
        )
        file = getattr(module, "__file__", None)
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise UsageError(f"--template: module {module_name!r} has no {attr!r}", file) from None
    template = _user_code(spec, f"{attr}()", file, factory) if explicit else factory
    if isinstance(template, nn.Module):
        raise UsageError(
            f"--template {spec!r}: a Linen module needs sample inputs to give its variables' "
            "shapes: return (module, *inputs), e.g. (Model(), jax.ShapeDtypeStruct(...))",
            file,
        )
    if isinstance(template, tuple) and template and isinstance(template[0], nn.Module):
        return _user_code(
            spec,
            f"{type(template[0]).__name__}.init on the sample inputs",
            file,
            abstract_linen_variables,
            *template,
        )
    return template


def abstract_linen_variables(module: nn.Module, *inputs: Any) -> Any:
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

    return jax.eval_shape(init, *(positional[i] for i in traced))


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(existing(path), "rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path}: invalid TOML: {error}", path) from None


RULE_FIELDS: dict[str, tuple[type, set[str], set[str]]] = {
    "split": (Split, {"fused", "parts"}, {"axis"}),
    "merge": (Merge, {"parts", "fused"}, {"axis"}),
    "unstack": (Unstack, {"stacked", "layers"}, {"over", "axis"}),
    "stack": (Stack, {"layers", "stacked"}, {"over", "axis"}),
}


def _rename(path: str, number: int, entry: Any) -> tuple[str, str]:
    """A `[[rename]]` entry whose pattern compiles and whose replacement refers only to
    groups the pattern has."""
    if not isinstance(entry, dict) or set(entry) != {"pattern", "replacement"}:
        raise UsageError(
            f"{path}: [[rename]] #{number} needs exactly pattern and replacement", path
        )
    pattern, replacement = str(entry["pattern"]), str(entry["replacement"])
    try:
        # the empty alternative matches "", so the replacement is expanded once
        re.compile(f"(?:{pattern})|").sub(replacement, "")
    except (re.error, IndexError) as error:
        raise UsageError(
            f"{path}: [[rename]] #{number} (pattern {pattern!r}, replacement {replacement!r}): "
            f"not a regular expression rename: {error}",
            path,
        ) from None
    return pattern, replacement


def load_rules(path: str) -> tuple[list[Any], dict[str, str]]:
    """The rules and the `[modules]` table of a rules TOML file (schema: `bridge.cli`)."""
    data = read_toml(path)
    known = {"rename", "modules", *RULE_FIELDS}
    if unknown := sorted(set(data) - known):
        raise UsageError(f"{path}: unknown table(s) {unknown}; known: {sorted(known)}", path)
    rules: list[Any] = [
        _rename(path, i + 1, entry) for i, entry in enumerate(data.get("rename", []))
    ]
    for name, (cls, required, optional) in RULE_FIELDS.items():
        for i, entry in enumerate(data.get(name, [])):
            keys = set(entry) if isinstance(entry, dict) else set()
            if not required <= keys or keys - required - optional:
                raise UsageError(
                    f"{path}: [[{name}]] #{i + 1} needs {sorted(required)}"
                    f" (optional {sorted(optional)}), got {sorted(keys)}",
                    path,
                )
            try:
                rules.append(cls(**entry))
            except (TypeError, ValueError) as error:
                raise UsageError(f"{path}: [[{name}]] #{i + 1}: {error}", path) from None
    return rules, modules_table(data, path)


def modules_table(data: dict[str, Any], path: str) -> dict[str, str]:
    table = data.get("modules")
    if table is None:
        table = {k: v for k, v in data.items() if isinstance(v, str)}
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise UsageError(f'{path}: [modules] must map patterns to family names ("Conv1D")', path)
    for pattern in table:
        try:
            re.compile(pattern)
        except re.error as error:
            raise UsageError(
                f"{path}: [modules] {pattern!r}: not a regular expression: {error}", path
            ) from None
    return dict(table)


def parse_dtype(name: str) -> str:
    """The numpy name of `--dtype`'s value (`bf16` -> `bfloat16`)."""
    import jax.numpy as jnp

    try:
        return np.dtype(jnp.dtype(DTYPES.get(name.lower(), name.lower()))).name
    except TypeError:
        raise UsageError(
            f"--dtype {name!r}: not a dtype; try bf16, fp16, fp32 or a numpy name"
        ) from None


def convert_options(
    template: str | None,
    rules: str | None,
    modules: str | None,
    dtype: str | None,
    casting: str | None,
    strict: bool,
) -> dict[str, Any]:
    """The keyword arguments of `bridge.convert` / `bridge.plan` the options ask for."""
    kwargs: dict[str, Any] = {"strict": strict, "progress": None}
    if template is not None:
        kwargs["template"] = load_template(template)
    found_modules: dict[str, str] = {}
    if rules is not None:
        kwargs["rules"], found_modules = load_rules(rules)
    if modules is not None:
        found_modules.update(modules_table(read_toml(modules), modules))
    if found_modules:
        kwargs["modules"] = found_modules
    if dtype is not None:
        kwargs["dtype"] = parse_dtype(dtype)
    if casting is not None:
        if dtype is None:
            raise UsageError("--casting says how --dtype casts; give --dtype too")
        if casting not in CASTINGS:
            raise UsageError(f"--casting {casting!r}: expected one of {', '.join(CASTINGS)}")
        kwargs["casting"] = casting
    return kwargs
