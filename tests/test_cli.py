"""The `bridge` command, run through its real entry point (`python -m bridge.cli`) in
subprocesses, on real files. Each subprocess imports JAX, so the commands run in
parallel in one module-scoped fixture and the tests assert on their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from flax import serialization

import bridge

ROOT = Path(__file__).resolve().parent.parent

TEMPLATE = textwrap.dedent(
    """
    from flax import nnx


    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])


    def abstract():
        return nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    """
)

LINEN_TEMPLATE = textwrap.dedent(
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp


    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x, relu, train=True):
            x = nn.Dense(3)(x)  # Dense_0
            x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x) if relu else x)
            return nn.Dense(2)(x)  # Dense_1


    def with_inputs():  # a flag, and a keyword argument; a traced flag would fail
        return Mlp(), jax.ShapeDtypeStruct((1, 4), jnp.float32), True, {"train": False}


    def with_wrong_inputs():
        return Mlp(), jnp.ones((1, 4)), True, {"no_such_argument": 1}


    def without_inputs():
        return Mlp()
    """
)

RULES = textwrap.dedent(
    """
    [[rename]]
    pattern = "^Dense_(\\\\d+)"
    replacement = "layers.\\\\1"
    """
)


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_all(cwd: Path, commands: dict[str, list[str]], after: dict[str, str]) -> dict[str, Any]:
    """Run `commands` in parallel, each named in `after` once the command it names ended;
    at most one more subprocess than there are CPUs at a time."""
    slots = threading.Semaphore((os.cpu_count() or 1) + 1)
    futures: dict[str, Future[subprocess.CompletedProcess[str]]] = {}

    def job(name: str) -> subprocess.CompletedProcess[str]:
        if name in after:
            futures[after[name]].result()
        with slots:
            return run(cwd, *commands[name])

    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        for name in sorted(commands, key=lambda name: name in after):
            futures[name] = pool.submit(job, name)
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Make the files, run every command (two waves: the second reads what the first
    wrote), and return the working directory and `{name: CompletedProcess}`."""
    work = tmp_path_factory.mktemp("cli")
    (work / "tmpl.py").write_text(TEMPLATE)
    (work / "rules.toml").write_text(RULES)
    (work / "linen_tmpl.py").write_text(LINEN_TEMPLATE)
    torch.manual_seed(0)
    dense = {
        "Dense_0.weight": torch.randn(3, 4),
        "Dense_0.bias": torch.randn(3),
        "Dense_1.weight": torch.randn(2, 3),
        "Dense_1.bias": torch.randn(2),
    }
    safetensors.torch.save_file(dense, work / "dense.safetensors")
    same = {key.replace("Dense_", "layers."): value for key, value in dense.items()}
    safetensors.torch.save_file(same, work / "same.safetensors")
    changed = dict(same, **{"layers.1.bias": same["layers.1.bias"] + 1.0})
    safetensors.torch.save_file(changed, work / "changed.safetensors")
    sys.path.insert(0, str(work))
    try:
        import tmpl  # the factory module the commands import too
    finally:
        sys.path.remove(str(work))
    model = bridge.convert(str(work / "same.safetensors"), to="nnx", template=tmpl.abstract())
    bridge.save(model, work / "saved_ckpt", format="orbax")
    (work / "taken.safetensors").write_bytes(b"not a checkpoint")
    (work / "hf").mkdir()  # a HF directory: weights and the files save_pretrained writes
    safetensors.torch.save_file(same, work / "hf" / "model.safetensors", metadata={"format": "pt"})
    (work / "hf" / "config.json").write_text('{"model_type": "mlp"}')
    (work / "hf" / "tokenizer").mkdir()
    (work / "hf" / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (work / "a_dir.pt").mkdir()
    (work / "a_dir.pt" / "keep.txt").write_text("kept")
    (work / "bad.toml").write_text('[[renam]]\npattern = "a"\nreplacement = "b"\n')

    convert = ["--template", "tmpl.py:abstract", "--rules", "rules.toml"]
    commands = {
        "version": ["--version"],
        "help": ["convert", "--help"],
        "formats": ["formats"],
        "formats_json": ["formats", "--json"],
        "inspect": ["inspect", "dense.safetensors"],
        "inspect_flat": ["inspect", "saved_ckpt", "--flat"],
        "inspect_json": ["inspect", "dense.safetensors", "--json"],
        "plan_json": ["plan", "dense.safetensors", "--to", "orbax", "--json", *convert],
        "plan_dotted": [
            "plan",
            "dense.safetensors",
            "--to",
            "nnx",
            "--template",
            "tmpl:abstract",
        ],
        "convert": ["convert", "dense.safetensors", "out_ckpt", "--to", "orbax", *convert],
        "mismatch": ["convert", "dense.safetensors", "mm_ckpt", "--to", "orbax", *convert[:2]],
        "to_linen_msgpack": [
            "convert",
            "dense.safetensors",
            "dense.msgpack",
            "--to",
            "msgpack",
            "--template",
            "linen_tmpl.py:with_inputs",
        ],
        "bad_linen_inputs": [
            "plan",
            "dense.safetensors",
            "--to",
            "msgpack",
            "--template",
            "linen_tmpl.py:with_wrong_inputs",
        ],
        "bare_linen": [
            "plan",
            "dense.safetensors",
            "--to",
            "msgpack",
            "--template",
            "linen_tmpl.py:without_inputs",
        ],
        "missing": ["inspect", "nope.safetensors"],
        "bad_rules": ["plan", "dense.safetensors", "--to", "nnx_state", "--rules", "bad.toml"],
        "bad_format": ["convert", "same.safetensors", "x", "--to", "onnx"],
        "bad_option": ["inspect", "same.safetensors", "--bogus"],
        "debug": ["--debug", "inspect", "nope.safetensors"],
        "diff_equal": ["diff", "same.safetensors", "saved_ckpt"],
        "diff_changed": ["diff", "same.safetensors", "changed.safetensors", "--json"],
        "diff_tolerant": ["diff", "same.safetensors", "changed.safetensors", "--atol", "1.5"],
        "no_overwrite": ["convert", "saved_ckpt", "taken.safetensors", "--to", "safetensors"],
        "to_torch": ["convert", "saved_ckpt", "out.pt", "--to", "torch", "--json"],
        "inspect_converted": ["inspect", "out_ckpt", "--json"],
        "diff_converted": ["diff", "out_ckpt", "same.safetensors", "--json"],
        "overwrite": [
            "convert",
            "saved_ckpt",
            "taken.safetensors",
            "--to",
            "safetensors",
            "--overwrite",
            "--dtype",
            "bf16",
            "--json",
        ],
        "in_place": [
            "convert",
            "hf",
            "hf",
            "--to",
            "safetensors",
            "--dtype",
            "bf16",
            "--overwrite",
            "--json",
        ],
        "torch_onto_dir": [
            "convert",
            "same.safetensors",
            "a_dir.pt",
            "--to",
            "torch",
            "--overwrite",
        ],
    }
    after = {
        "inspect_converted": "convert",
        "diff_converted": "convert",
        "overwrite": "no_overwrite",
    }
    return work, run_all(work, commands, after)


def test_version_and_help(cli: tuple[Path, dict[str, Any]]) -> None:
    _, out = cli
    assert out["version"].returncode == 0
    assert out["version"].stdout.strip() == f"bridge {bridge.__version__}"
    assert out["help"].returncode == 0
    assert "Examples:" in out["help"].stdout
    assert "--template" in out["help"].stdout and "[[rename]]" in out["help"].stdout


def test_formats_lists_formats_and_edges(cli: tuple[Path, dict[str, Any]]) -> None:
    _, out = cli
    assert out["formats"].returncode == 0
    for name in ("safetensors", "orbax", "msgpack", "nnx_state", "linen", "torch"):
        assert name in out["formats"].stdout
    assert "nnx_state -> linen" in out["formats"].stdout
    data = json.loads(out["formats_json"].stdout)
    assert {f["name"] for f in data["formats"]} >= {"safetensors", "orbax", "torch"}
    edges = {(e["src"], e["dst"]): e for e in data["conversions"]}
    assert edges["nnx_state", "linen"]["lossy"] and "RNG" in edges["nnx_state", "linen"]["loses"]
    assert edges["torch", "safetensors"]["needs"] == ["path"]


def test_inspect_tree_table_and_json(cli: tuple[Path, dict[str, Any]]) -> None:
    _, out = cli
    tree = out["inspect"]
    assert tree.returncode == 0, tree.stderr
    assert "Dense_0" in tree.stdout and "weight  (3, 4) float32  48 B" in tree.stdout
    assert "4 arrays, 92 bytes" in tree.stdout
    table = out["inspect_flat"]
    assert table.returncode == 0, table.stderr
    assert "orbax" in table.stdout and "layers.0.kernel" in table.stdout
    assert "(4, 3)" in table.stdout
    data = json.loads(out["inspect_json"].stdout)
    assert data["format"] == "safetensors" and data["arrays"] == 4 and data["bytes"] == 92
    leaves = {leaf["key"]: leaf for leaf in data["leaves"]}
    assert leaves["Dense_0.weight"] == {
        "key": "Dense_0.weight",
        "shape": [3, 4],
        "dtype": "float32",
        "bytes": 48,
    }


def test_plan_json_rows_apply_the_rules(cli: tuple[Path, dict[str, Any]]) -> None:
    _, out = cli
    result = out["plan_json"]
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == "safetensors" and data["target"] == "orbax"
    assert [e["dst"] for e in data["route"]][-1] == "orbax"
    rows = {row["target"]: row for row in data["rows"]}
    assert rows["layers.0.kernel"]["source"] == "Dense_0.weight"
    assert rows["layers.0.kernel"]["transform"] == "transpose"
    assert rows["layers.0.kernel"]["shape"] == [4, 3]
    assert data["report"]["ok"] is True
    dotted = out["plan_dotted"]  # the template as a dotted module name, without rules
    assert dotted.returncode == 1
    assert "missing" in dotted.stdout and "layers.0.kernel" in dotted.stdout


def test_convert_with_template_and_rules_then_inspect(cli: tuple[Path, dict[str, Any]]) -> None:
    work, out = cli
    assert out["convert"].returncode == 0, out["convert"].stderr
    assert "wrote out_ckpt (orbax): 4 arrays" in out["convert"].stdout
    data = json.loads(out["inspect_converted"].stdout)
    assert data["format"] == "orbax"
    shapes = {leaf["key"]: leaf["shape"] for leaf in data["leaves"]}
    assert shapes == {
        "layers.0.kernel": [4, 3],
        "layers.0.bias": [3],
        "layers.1.kernel": [3, 2],
        "layers.1.bias": [2],
    }
    diff = json.loads(out["diff_converted"].stdout)  # across formats, values and layout
    assert out["diff_converted"].returncode == 0 and diff["equal"] is True
    assert diff["a"]["format"] == "orbax" and diff["b"]["format"] == "safetensors"
    assert out["to_torch"].returncode == 0, out["to_torch"].stderr
    assert json.loads(out["to_torch"].stdout)["arrays"] == 4
    loaded = torch.load(work / "out.pt", weights_only=True)
    expected = safetensors.torch.load_file(work / "same.safetensors")
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_a_linen_module_with_sample_inputs_is_a_template(
    cli: tuple[Path, dict[str, Any]],
) -> None:
    work, out = cli
    done = out["to_linen_msgpack"]
    assert done.returncode == 0, done.stderr
    variables = serialization.msgpack_restore((work / "dense.msgpack").read_bytes())
    weights = safetensors.numpy.load_file(work / "dense.safetensors")
    for layer in ("Dense_0", "Dense_1"):
        params = variables["params"][layer]
        np.testing.assert_array_equal(params["kernel"], weights[f"{layer}.weight"].T)
        np.testing.assert_array_equal(params["bias"], weights[f"{layer}.bias"])
    bad = out["bad_linen_inputs"]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Mlp.init on the sample inputs failed" in bad.stderr
    bare = out["bare_linen"]
    assert bare.returncode == 2 and "return (module, *inputs)" in bare.stderr


def test_diff_equal_and_changed(cli: tuple[Path, dict[str, Any]]) -> None:
    _, out = cli
    assert out["diff_equal"].returncode == 0, out["diff_equal"].stderr
    assert "equal" in out["diff_equal"].stdout
    changed = out["diff_changed"]
    assert changed.returncode == 1
    data = json.loads(changed.stdout)
    assert data["equal"] is False and [v["key"] for v in data["values"]] == ["layers_1/bias"]
    assert np.isclose(data["values"][0]["max_abs_diff"], 1.0)
    assert not (data["only_a"] or data["only_b"] or data["shape"] or data["dtype"])
    assert out["diff_tolerant"].returncode == 0, out["diff_tolerant"].stdout


def test_mismatch_is_one_line_exit_1(cli: tuple[Path, dict[str, Any]]) -> None:
    work, out = cli
    result = out["mismatch"]
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bridge: error: mismatch")
    assert "layers.0.kernel" in result.stderr or "Dense_0" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (work / "mm_ckpt").exists()


def test_input_errors_exit_2_without_traceback(cli: tuple[Path, dict[str, Any]]) -> None:
    _, out = cli
    missing = out["missing"]
    assert missing.returncode == 2
    assert missing.stderr == "bridge: error: no such file or directory: 'nope.safetensors'\n"
    bad = out["bad_format"]
    assert bad.returncode == 2 and "unknown format 'onnx'" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    option = out["bad_option"]
    assert option.returncode == 2 and "--bogus" in option.stderr
    assert "Traceback" not in option.stderr
    rules = out["bad_rules"]
    assert rules.returncode == 2 and rules.stderr.count("\n") == 1
    assert "bad.toml: unknown table(s) ['renam']" in rules.stderr
    debug = out["debug"]
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().endswith("no such file or directory: 'nope.safetensors'")


def test_overwrite(cli: tuple[Path, dict[str, Any]]) -> None:
    work, out = cli
    refused = out["no_overwrite"]
    assert refused.returncode == 2
    assert "exists" in refused.stderr and "--overwrite" in refused.stderr
    assert out["overwrite"].returncode == 0, out["overwrite"].stderr
    assert json.loads(out["overwrite"].stdout)["bytes"] == 46  # bf16: half of 92
    written = safetensors.torch.load_file(work / "taken.safetensors")
    expected = safetensors.torch.load_file(work / "same.safetensors")
    assert written.keys() == expected.keys()
    assert {tensor.dtype for tensor in written.values()} == {torch.bfloat16}
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor.to(torch.bfloat16))


def test_an_hf_directory_cast_in_place_keeps_its_other_files(
    cli: tuple[Path, dict[str, Any]],
) -> None:
    work, out = cli
    assert out["in_place"].returncode == 0, out["in_place"].stderr
    assert json.loads(out["in_place"].stdout)["bytes"] == 46  # bf16: half of 92
    written = safetensors.torch.load_file(work / "hf" / "model.safetensors")
    expected = safetensors.torch.load_file(work / "same.safetensors")
    assert written.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor.to(torch.bfloat16))
    assert (work / "hf" / "config.json").read_text() == '{"model_type": "mlp"}'
    assert (work / "hf" / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert sorted(p.name for p in (work / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]


def test_a_directory_never_becomes_a_pt_file(cli: tuple[Path, dict[str, Any]]) -> None:
    work, out = cli
    refused = out["torch_onto_dir"]
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "a_dir.pt is a directory; a file output never replaces a directory" in refused.stderr
    assert (work / "a_dir.pt" / "keep.txt").read_text() == "kept"
