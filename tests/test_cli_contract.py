"""The CLI contract, for every failure: one line on stderr, exit 2 (usage or input) or 1
(a mismatch or a difference), no traceback unless `--debug`; with `--json`, stdout holds
one JSON document, on error too: `{"error": {"type", "message", "path"}}`.

The table runs through the console script's entry point in this process (each command
would otherwise import JAX again); the Orbax cases run in subprocesses, where a stray
traceback of Orbax's background threads would show at the interpreter's exit."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch

import bridge
from bridge import cli

ROOT = Path(__file__).resolve().parent.parent

TEMPLATES = textwrap.dedent(
    """
    from flax import nnx


    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 3, rngs=rngs)])


    def abstract():
        return nnx.eval_shape(lambda: Net(nnx.Rngs(0)))


    def boom():
        raise RuntimeError("factory exploded")
    """
)


def _safetensors(path: Path, header: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of good, bad and hostile inputs."""
    work = tmp_path_factory.mktemp("contract")
    (work / "tmpl.py").write_text(TEMPLATES)
    (work / "raises_on_import.py").write_text("raise ImportError('no such dependency: foo')\n")
    (work / "syntax.py").write_text("def f(:\n")
    rng = np.random.default_rng(0)
    weights = {"Dense_0.weight": rng.normal(size=(3, 4)).astype(np.float32)}
    weights["Dense_0.bias"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(weights, work / "ok.safetensors")
    changed = dict(weights, **{"Dense_0.bias": np.ones(3, np.float32)})
    safetensors.numpy.save_file(changed, work / "changed.safetensors")
    _safetensors(work / "corrupt.safetensors", b"{not json")
    _safetensors(work / "bomb.safetensors", b"[" * 2000 + b"]" * 2000)
    huge = {"t": {"dtype": "F32", "shape": [2**63], "data_offsets": [0, 0]}}
    _safetensors(work / "huge.safetensors", json.dumps(huge).encode())
    torch.save({"ok": torch.zeros(1), 7: torch.zeros(2)}, work / "int_keys.pt")
    (work / "deep.msgpack").write_bytes(b"\x81\xa1a" * 1000 + b"\x01")  # {"a": {"a": ...}}
    torch.save({"a": torch.zeros(1), "a.b": torch.zeros(1)}, work / "leaf_and_parent.pt")
    (work / "paren.toml").write_text('[[rename]]\npattern = "("\nreplacement = "x"\n')
    (work / "group.toml").write_text('[[rename]]\npattern = "^a"\nreplacement = "\\\\9"\n')
    (work / "modules.toml").write_text('[modules]\n"[" = "Conv1D"\n')
    (work / "broken.toml").write_text("[[rename]\n")
    (work / "empty_dir").mkdir()
    return work


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def invoke(work: Path, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any) -> Result:
    """`bridge *args` through the console script's entry point, in `work`."""
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["bridge", *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # template imports add to it
    capsys.readouterr()
    absl = logging.getLogger("absl")
    level = absl.level
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main()
    finally:
        absl.setLevel(level)  # the command quiets it
    out, err = capsys.readouterr()
    return Result(exited.value.code, out, err)


PLAN = ["plan", "ok.safetensors", "--to", "nnx_state"]
TMPL = ["--template", "tmpl.py:abstract"]
DIFF = ["diff", "ok.safetensors", "changed.safetensors"]

# name: (arguments, exit status, error type, the path the error names, words of the line)
FAILURES: dict[str, tuple[list[str], int, str, str | None, str]] = {
    "rules pattern `(`": (
        [*PLAN, "--rules", "paren.toml"],
        2,
        "UsageError",
        "paren.toml",
        "[[rename]] #1 (pattern '('",
    ),
    "rules replacement of a group the pattern lacks": (
        [*PLAN, "--rules", "group.toml"],
        2,
        "UsageError",
        "group.toml",
        "invalid group reference",
    ),
    "modules pattern `[`": (
        [*PLAN, "--modules", "modules.toml"],
        2,
        "UsageError",
        "modules.toml",
        "not a regular expression",
    ),
    "rules file that is not TOML": (
        [*PLAN, "--rules", "broken.toml"],
        2,
        "UsageError",
        "broken.toml",
        "invalid TOML",
    ),
    "template factory that raises": (
        [*PLAN, "--template", "tmpl.py:boom"],
        2,
        "UsageError",
        "tmpl.py",
        "--template 'tmpl.py:boom': boom() failed: RuntimeError: factory exploded",
    ),
    "template module that raises on import": (
        [*PLAN, "--template", "raises_on_import.py:f"],
        2,
        "UsageError",
        "raises_on_import.py",
        "importing raises_on_import.py failed: ImportError: no such dependency: foo",
    ),
    "template module that does not parse": (
        [*PLAN, "--template", "syntax.py:f"],
        2,
        "UsageError",
        "syntax.py",
        "SyntaxError",
    ),
    "template factory that is not there": (
        [*PLAN, "--template", "tmpl.py:nothing"],
        2,
        "UsageError",
        "tmpl.py",
        "has no 'nothing'",
    ),
    "dotted template module that is not there": (
        [*PLAN, "--template", "no_such_module:f"],
        2,
        "UsageError",
        None,
        "No module named 'no_such_module'",
    ),
    "nonexistent path": (
        ["inspect", "nope.safetensors"],
        2,
        "UsageError",
        "nope.safetensors",
        "no such file or directory: 'nope.safetensors'",
    ),
    "nonexistent second file of diff": (
        ["diff", "ok.safetensors", "nope.safetensors"],
        2,
        "UsageError",
        "nope.safetensors",
        "no such file or directory",
    ),
    "diff against a corrupt second file": (
        ["diff", "ok.safetensors", "corrupt.safetensors"],
        2,
        "FormatError",
        "corrupt.safetensors",
        "is not JSON",
    ),
    "corrupt safetensors header": (
        ["inspect", "corrupt.safetensors"],
        2,
        "FormatError",
        "corrupt.safetensors",
        "is not JSON",
    ),
    "nesting bomb in a safetensors header": (
        ["convert", "bomb.safetensors", "out.msgpack", "--to", "msgpack"],
        2,
        "FormatError",
        "bomb.safetensors",
        "nests deeper",
    ),
    "shape dimension of 2**63": (
        ["plan", "huge.safetensors", "--to", "torch"],
        2,
        "FormatError",
        "huge.safetensors",
        "huge.safetensors",
    ),
    "int key in a .pt file": (
        ["inspect", "int_keys.pt"],
        2,
        "FormatError",
        "int_keys.pt",
        "key 7 is of type int",
    ),
    "msgpack maps nested 1000 deep": (
        ["inspect", "deep.msgpack"],
        2,
        "FormatError",
        "deep.msgpack",
        "deep.msgpack",
    ),
    "a file holding a and a.b, to a nested format": (
        ["convert", "leaf_and_parent.pt", "ab.msgpack", "--to", "msgpack"],
        2,
        "FormatError",
        "leaf_and_parent.pt",
        "'a' is both a leaf and the parent of 'a/b'; a nested tree cannot hold both, "
        "rename one with --rules FILE",
    ),
    "directory of no format": (
        ["inspect", "empty_dir"],
        2,
        "FormatError",
        "empty_dir",
        "empty_dir",
    ),
    "unknown format": (
        ["convert", "ok.safetensors", "x", "--to", "onnx"],
        2,
        "NoRouteError",
        "ok.safetensors",
        "unknown format 'onnx'",
    ),
    "in-memory format for convert": (
        ["convert", "ok.safetensors", "x", "--to", "nnx"],
        2,
        "UsageError",
        None,
        "--to nnx is an in-memory format",
    ),
    "--dtype that is no dtype": (
        [*PLAN, "--dtype", "bogus16"],
        2,
        "UsageError",
        None,
        "--dtype 'bogus16': not a dtype",
    ),
    "--dtype to an integer without --casting": (
        [*PLAN, "--dtype", "int8"],
        2,
        "FormatError",
        "ok.safetensors",
        "pass --casting unsafe to ask for it",
    ),
    "--casting that numpy does not name": (
        [*PLAN, "--dtype", "int8", "--casting", "whatever"],
        2,
        "UsageError",
        None,
        "--casting 'whatever': expected one of same_kind, unsafe",
    ),
    "--casting without --dtype": (
        [*PLAN, "--casting", "unsafe"],
        2,
        "UsageError",
        None,
        "--casting says how --dtype casts",
    ),
    "output that exists": (
        ["convert", "ok.safetensors", "changed.safetensors", "--to", "safetensors"],
        2,
        "OutputExistsError",
        "changed.safetensors",
        "changed.safetensors exists; pass --overwrite to replace it",
    ),
    "mismatch on convert": (
        ["convert", "ok.safetensors", "mm.safetensors", "--to", "safetensors", *TMPL],
        1,
        "MismatchError",
        "ok.safetensors",
        "mismatch: ",
    ),
    "mismatch on plan": ([*PLAN, *TMPL], 1, "MismatchError", "ok.safetensors", "mismatch: "),
    "diff differences": (
        DIFF,
        1,
        "Differences",
        None,
        "values rtol=0, atol=0 (NaN == NaN, -0.0 == 0.0): 1 values (Dense_0/bias)",
    ),
    "unknown option": (
        ["inspect", "ok.safetensors", "--bogus"],
        2,
        "UsageError",
        None,
        "No such option: --bogus (see `bridge inspect -h`)",
    ),
    "missing argument": (
        ["convert", "ok.safetensors"],
        2,
        "UsageError",
        None,
        "Missing argument 'DST'",
    ),
    "--exact with a tolerance": (
        [*DIFF, "--exact", "--atol", "1"],
        2,
        "UsageError",
        None,
        "--exact compares bits; it takes no --rtol / --atol",
    ),
}


@pytest.mark.parametrize("name", FAILURES)
def test_a_failure_is_one_line_and_with_json_one_document(
    name: str, work: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    args, code, kind, path, words = FAILURES[name]
    for as_json in (False, True):
        result = invoke(work, [*args, "--json"] if as_json else args, monkeypatch, capsys)
        assert result.code == code, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("bridge: error: ")
        assert words in result.stderr
        if not as_json:
            assert not result.stdout.lstrip().startswith("{")
            continue
        document = json.loads(result.stdout)  # one document: json.loads refuses a second
        error = document["error"]
        assert error["type"] == kind
        assert error["message"] == result.stderr.removeprefix("bridge: error: ").rstrip("\n")
        if path is None:
            assert error["path"] is None
        else:
            assert Path(error["path"]).name == Path(path).name
        if kind == "MismatchError":  # the report travels with it, for scripts
            report = document.get("report") or error["report"]
            assert report["ok"] is False and report["unexpected"]
    assert not (work / "mm.safetensors").exists() and not (work / "out.msgpack").exists()


def test_no_command_prints_the_commands_and_one_line(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    result = invoke(work, [], monkeypatch, capsys)
    assert result.code == 2
    assert "Commands" in result.stdout and "convert" in result.stdout
    assert result.stderr == "bridge: error: no command given\n"


def test_debug_shows_the_traceback_of_the_factory_then_the_line(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    result = invoke(work, ["--debug", *PLAN, "--template", "tmpl.py:boom"], monkeypatch, capsys)
    assert result.code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert 'raise RuntimeError("factory exploded")' in result.stderr  # the user's own line
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("bridge: error: --template 'tmpl.py:boom': boom() failed")


def test_a_plan_that_fails_keeps_its_rows_in_the_json_document(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    result = invoke(work, [*PLAN, *TMPL, "--json"], monkeypatch, capsys)
    document = json.loads(result.stdout)
    assert result.code == 1
    assert sorted(row["target"] for row in document["rows"]) == ["layers.0.bias", "layers.0.kernel"]
    assert document["report"]["ok"] is False and document["error"]["type"] == "MismatchError"


def test_casting_unsafe_casts_floating_leaves_to_integers(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    args = ["convert", "ok.safetensors", "int8.safetensors", "--to", "safetensors"]
    result = invoke(work, [*args, "--dtype", "int8", "--casting", "unsafe"], monkeypatch, capsys)
    assert result.code == 0, result.stderr
    written = safetensors.numpy.load_file(work / "int8.safetensors")
    source = safetensors.numpy.load_file(work / "ok.safetensors")
    assert written.keys() == source.keys()
    for key, array in source.items():
        assert written[key].dtype == np.int8
        np.testing.assert_array_equal(written[key], array.astype(np.int8))


# --- diff: bits or numbers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def signed(work: Path) -> Path:
    """Two files whose values are equal as numbers and differ as bits (NaNs of two
    payloads, -0.0 and 0.0), and a third that also differs as numbers."""
    quiet, payload = 0x7FC00000, 0x7FC00001
    minus_zero, zero = np.float32(-0.0).view(np.uint32), np.float32(0.0).view(np.uint32)
    one_and_half = np.float32(1.5).view(np.uint32)
    a = np.array([quiet, minus_zero, one_and_half], np.uint32).view(np.float32)
    b = np.array([payload, zero, one_and_half], np.uint32).view(np.float32)
    safetensors.numpy.save_file({"w": a}, work / "bits_a.safetensors")
    safetensors.numpy.save_file({"w": b}, work / "bits_b.safetensors")
    c = b.copy()
    c[2] = 2.5
    safetensors.numpy.save_file({"w": c}, work / "bits_c.safetensors")
    return work


def test_diff_says_how_it_compared_and_exact_compares_bits(
    signed: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    pair = ["diff", "bits_a.safetensors", "bits_b.safetensors"]
    numbers = invoke(signed, pair, monkeypatch, capsys)
    assert numbers.code == 0, numbers.stderr
    assert "values rtol=0, atol=0 (NaN == NaN, -0.0 == 0.0)" in numbers.stdout
    document = json.loads(invoke(signed, [*pair, "--json"], monkeypatch, capsys).stdout)
    assert document["equal"] is True
    assert document["comparison"] == {"mode": "tolerance", "rtol": 0.0, "atol": 0.0}

    bits = invoke(signed, [*pair, "--exact", "--json"], monkeypatch, capsys)
    assert bits.code == 1 and bits.stderr.count("\n") == 1
    assert "values bit for bit: 1 values (w)" in bits.stderr
    document = json.loads(bits.stdout)
    assert document["comparison"] == {"mode": "exact"}
    assert document["values"] == [{"key": "w", "elements": 2, "max_abs_diff": 0.0}]
    assert document["error"]["type"] == "Differences"

    itself = ["diff", "bits_a.safetensors", "bits_a.safetensors", "--exact"]
    same = invoke(signed, itself, monkeypatch, capsys)
    assert same.code == 0 and "values bit for bit" in same.stdout

    tolerant = ["diff", "bits_b.safetensors", "bits_c.safetensors"]
    assert invoke(signed, [*tolerant, "--atol", "1.5"], monkeypatch, capsys).code == 0
    strict = invoke(signed, [*tolerant, "--atol", "0.5", "--json"], monkeypatch, capsys)
    assert strict.code == 1
    values = json.loads(strict.stdout)["values"]
    assert values == [{"key": "w", "elements": 1, "max_abs_diff": 1.0}]


# --- Orbax, through the real entry point -----------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:10])


ORBAX_DAMAGE = {
    "_CHECKPOINT_METADATA garbage": lambda d: (d / "_CHECKPOINT_METADATA").write_text("{x"),
    "_METADATA missing": lambda d: (d / "_METADATA").unlink(),
    "manifest truncated": lambda d: _truncate(d / "manifest.ocdbt"),
    "array metadata truncated": lambda d: [_truncate(f) for f in (d / "d").iterdir()],
}


def test_a_damaged_orbax_checkpoint_is_one_line_without_stray_tracebacks(
    tmp_path: Path,
) -> None:
    state = {"params": {"dense": {"kernel": np.ones((2, 2), np.float32)}}}
    saved = bridge.save(state, tmp_path / "ckpt", format="orbax", source="linen")
    commands = {}
    for name, damage in ORBAX_DAMAGE.items():
        damaged = tmp_path / name.replace(" ", "_")
        shutil.copytree(saved, damaged)
        damage(damaged)
        commands[name] = ["convert", damaged.name, f"{damaged.name}.safetensors"]
    commands["missing"] = ["convert", "no_such_ckpt", "x.safetensors"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", *args, "--to", "safetensors", "--json"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 2, (name, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("bridge: error: "), (name, stderr)
        error = json.loads(stdout)["error"]
        assert error["path"] == commands[name][1], name
        assert error["type"] in ("FormatError", "UsageError"), name
