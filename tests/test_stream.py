"""File-to-file conversions stream in bounded batches: the streamed writers give the
bytes Flax and the in-memory path give, layout rules and casts apply as in memory, the
bytes in flight stay within a batch plus the largest tensor, one progress bar covers
the job, and a killed conversion leaves no half checkpoint under the target name."""

from __future__ import annotations

import importlib
import json
import re
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx, serialization, traverse_util
from orbax.checkpoint import type_handlers

import bridge
from bridge import api, progress
from bridge.errors import FormatError

safetensors_format = importlib.import_module("bridge.formats.safetensors")
orbax_restore = importlib.import_module("bridge.formats.orbax_restore")
nnx_models = importlib.import_module("nnx_models")

ROOT = Path(__file__).resolve().parent.parent
LEFTOVER = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
CONFIG = nnx_models.HF_CONFIGS["llama"]
SMALL_BATCH = 20_000
"""Bytes per batch in these tests: a few tensors of the small Llama (16 KiB at most)."""


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A small HF Llama and its `save_pretrained` directory, sharded."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(CONFIG).eval()
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    return model, directory


def nnx_template() -> nnx.Module:
    return nnx.eval_shape(lambda: nnx_models.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)))


def in_memory(monkeypatch: pytest.MonkeyPatch, call: Any) -> Any:
    """`call()` with streaming off: everything read, then written, as from memory."""
    with monkeypatch.context() as patch:
        patch.setattr(api, "is_file_to_file", lambda obj, options: False)
        return call()


def restored(directory: Path, target: Any = None) -> dict[str, Any]:
    """The checkpoint's arrays as `StandardCheckpointer` restores them (into `target`, an
    abstract tree, if given): bridge writes the standard v0 layout, streamed or not."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory.absolute(), target)


def abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tree)


DATA_FILE = re.compile(r"(ocdbt\.process_)[0-9a-f]+|(?<![^/])(d/)[0-9a-f]{32}$")
"""What differs between two saves of the same tree: OCDBT's data files and per-process
directories have random names (and a partial save makes one directory per batch)."""
TIMESTAMPS = ("init_timestamp_nsecs", "commit_timestamp_nsecs")


def files_and_metadata(directory: Path) -> tuple[set[str], dict[str, Any], dict[str, Any], str]:
    """A checkpoint's file listing (data file names masked), its tree metadata, its
    checkpoint metadata without timestamps, and its commit file naming the directory it
    was committed as (bridge's temporary) masked."""
    listing = {
        DATA_FILE.sub(r"\1\2*", p.relative_to(directory).as_posix()) for p in directory.rglob("*")
    }
    step = json.loads((directory / "_CHECKPOINT_METADATA").read_text())
    assert all(isinstance(step.pop(name), int) for name in TIMESTAMPS)
    committed = (directory / "commit_success.txt").read_text()
    return (
        listing,
        json.loads((directory / "_METADATA").read_text()),
        step,
        re.sub(r"/\S*$", "/...", committed),
    )


def custom_metadata(directory: Path) -> dict[str, Any]:
    return ocp.metadata.get_step_metadata(directory.absolute()).custom_metadata


def assert_trees_equal(a: Any, b: Any) -> None:
    assert isinstance(a, dict) == isinstance(b, dict)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_trees_equal(a[key], b[key])
    else:
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# --- msgpack: the bytes Flax writes ------------------------------------------------------


def msgpack_trees() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    # uint8 vectors whose payloads cross msgpack's bin/ext length forms (fixext 16,
    # ext 8/16/32 and bin 8/16/32 boundaries)
    sizes = [0, 1, 3, 4, 200, 240, 241, 250, 255, 256, 65_500, 65_529, 65_530, 65_536, 70_000]
    linen = {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_normal((5, 7)).astype(np.float32),
                "bias": np.arange(7, dtype=np.int64),
            },
            "layers_1": {"scale": rng.standard_normal(9).astype(ml_dtypes.bfloat16)},
            "scalar": np.zeros((), np.float16),
        },
        "batch_stats": {"Dense_0": {"mean": np.ones(3, np.float64)}},
    }
    plain = {
        "bytes": {str(size): rng.integers(0, 255, size, dtype=np.uint8) for size in sizes},
        "mixed": {"flag": np.array([True, False]), "count": np.int32(7), "ratio": 0.5},
        "wide": rng.standard_normal((3, 4, 5)).astype(np.complex64),
    }
    return [linen, plain]


@pytest.mark.parametrize("chunk", [None, 64, 1])
@pytest.mark.parametrize("which", [0, 1])
def test_msgpack_files_stream_to_the_bytes_flax_writes(tmp_path, monkeypatch, chunk, which):
    """A file Flax wrote, converted file to file, in small batches: the same bytes, chunked
    arrays included (Flax's own tests shrink MAX_CHUNK_SIZE the same way)."""
    if chunk is not None:
        monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", chunk)
    tree = msgpack_trees()[which]
    expected = serialization.to_bytes(tree)
    if chunk is not None:
        assert b"__msgpack_chunked_array__" in expected
    source = tmp_path / "in.msgpack"
    source.write_bytes(expected)
    out = bridge.save(source, tmp_path / "out.msgpack", format="msgpack", batch_bytes=1000)
    assert out.read_bytes() == expected
    assert bridge.convert(expected, to="msgpack") == expected  # bytes in, bytes out


def test_msgpack_writer_refuses_a_value_too_large_for_msgpack():
    with pytest.raises(FormatError, match="4 GiB"):
        importlib.import_module("bridge.formats.msgpack")._header({}, (1, 2, 3), 2**32)


# --- streamed == in memory --------------------------------------------------------------


def test_safetensors_to_orbax_streams_what_the_in_memory_path_saves(tmp_path, monkeypatch, llama):
    """HF directory -> Orbax with an NNX template (transposes): batch by batch through
    Orbax's numpy writer, the same arrays, description and report as in memory."""
    _, directory = llama
    calls = []
    original = type_handlers.NumpyHandler._background_serialize

    async def counted(self, values, *args, **kwargs):
        calls.append(len(values))
        return await original(self, values, *args, **kwargs)

    monkeypatch.setattr(type_handlers.NumpyHandler, "_background_serialize", counted)
    options = {"template": nnx_template(), "strict": False, "batch_bytes": SMALL_BATCH}

    _, streamed_report = bridge.save(directory, tmp_path / "streamed", format="orbax", **options)
    assert len(calls) > 3  # many batches
    streamed_writes = list(calls)
    _, memory_report = in_memory(
        monkeypatch,
        lambda: bridge.save(directory, tmp_path / "memory", format="orbax", **options),
    )
    assert calls[len(streamed_writes) :] == [sum(streamed_writes)]  # one write of them all
    assert str(streamed_report) == str(memory_report)
    # the standard v0 layout StandardCheckpointer writes: its files, metadata and arrays
    streamed, memory = tmp_path / "streamed", tmp_path / "memory"
    assert files_and_metadata(streamed) == files_and_metadata(memory)
    assert not (streamed / "state").exists()
    expected = restored(memory)
    assert_trees_equal(restored(streamed), expected)
    assert_trees_equal(restored(streamed, abstract(expected)), expected)
    assert custom_metadata(streamed) == custom_metadata(memory)
    # readable without a template, kinds and int keys as saved
    model = bridge.load(tmp_path / "streamed", to="nnx", template=nnx_template())
    kernel = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert kernel.shape == (32, 32)
    hf = llama[0].state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.asarray(kernel).tobytes() == np.ascontiguousarray(hf.T).tobytes()
    state = bridge.load(tmp_path / "streamed", to="nnx_state")
    assert type(state["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]) is nnx.Param


@pytest.mark.parametrize(
    "target, options",
    [
        ("out.safetensors", {"dtype": "bfloat16"}),
        ("hf", {"max_shard_size": "30KB"}),
        ("out.msgpack", {}),
        ("ckpt", {}),
    ],
)
def test_orbax_to_files_streams_what_the_in_memory_path_writes(
    tmp_path, monkeypatch, llama, target, options
):
    """Orbax -> safetensors (a file, with a cast; a sharded HF directory, with the torch
    template's transposes), msgpack, Orbax: partial restores batch by batch give the same
    bytes as restoring everything first."""
    model, directory = llama
    checkpoint = tmp_path / "source"
    bridge.save(directory, checkpoint, format="orbax", template=nnx_template())
    fmt = "orbax" if target == "ckpt" else "msgpack" if target.endswith("msgpack") else None
    fmt = fmt or "safetensors"
    if target == "hf":  # an export to HF: the torch model's names and layouts
        options = {**options, "template": model}
    fetches = []
    original = orbax_restore.Item.fetch
    monkeypatch.setattr(
        orbax_restore.Item,
        "fetch",
        lambda self, arrays: fetches.append(1) or original(self, arrays),
    )
    streamed = bridge.save(
        checkpoint, tmp_path / "streamed" / target, format=fmt, batch_bytes=SMALL_BATCH, **options
    )
    assert len(fetches) > 3
    memory = in_memory(
        monkeypatch,
        lambda: bridge.save(checkpoint, tmp_path / "memory" / target, format=fmt, **options),
    )
    assert len(fetches) > 3
    if fmt == "orbax":
        assert_trees_equal(restored(streamed), restored(memory))
        assert custom_metadata(streamed) == custom_metadata(memory)
        return
    files = sorted(p.name for p in memory.iterdir()) if memory.is_dir() else [""]
    assert files == (sorted(p.name for p in streamed.iterdir()) if streamed.is_dir() else [""])
    for name in files:
        assert (streamed / name).read_bytes() == (memory / name).read_bytes(), name
    if target == "hf":  # the exported weights are HF's own, bit for bit
        back = {}
        for shard in streamed.glob("*.safetensors"):
            back.update(safetensors.torch.load_file(shard))
        expected = model.state_dict()
        assert back.keys() == expected.keys()
        for key, value in expected.items():
            assert back[key].numpy().tobytes() == value.numpy().tobytes(), key


def test_a_torch_file_streams_as_the_in_memory_path_writes(tmp_path, monkeypatch):
    """A `.pt` file (memory-mapped by torch) into msgpack, in small batches."""
    tensors = {key: torch.from_numpy(value) for key, value in many_tensors().items()}
    source = tmp_path / "weights.pt"
    torch.save(tensors, source)
    streamed = bridge.save(
        source, tmp_path / "streamed.msgpack", format="msgpack", batch_bytes=9000
    )
    memory = in_memory(
        monkeypatch, lambda: bridge.save(source, tmp_path / "memory.msgpack", format="msgpack")
    )
    assert streamed.read_bytes() == memory.read_bytes()
    written = traverse_util.flatten_dict(serialization.msgpack_restore(streamed.read_bytes()))
    assert sorted(value.tobytes() for value in written.values()) == sorted(
        tensor.numpy().tobytes() for tensor in tensors.values()
    )


# --- bounded memory ---------------------------------------------------------------------


class InFlight:
    """Counts the bytes of arrays a reader handed out that are still alive."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.reads = 0

    def hand_out(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for array in arrays:
            self.now += array.nbytes
            self.reads += 1
            self.peak = max(self.peak, self.now)
            weakref.finalize(array, self._gone, array.nbytes)
        return arrays

    def _gone(self, nbytes: int) -> None:
        self.now -= nbytes


def many_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [3000, 500, 12_000, 40, 7000, 7000, 9000, 100, 2500, 6000, 11_000, 800]
    return {
        f"layers.{i}.weight": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)
    }


@pytest.mark.parametrize("target", ["out.safetensors", "out.msgpack", "ckpt"])
def test_bytes_in_flight_stay_within_one_batch_and_the_largest_tensor(
    tmp_path, monkeypatch, target
):
    tensors = many_tensors()
    largest = max(array.nbytes for array in tensors.values())
    batch = 60_000
    assert sum(array.nbytes for array in tensors.values()) > 3 * batch

    checkpoint = tmp_path / "ckpt_in"
    bridge.save(tensors, checkpoint, format="orbax", source="torch")
    orbax_counter = InFlight()
    original_fetch = orbax_restore.Item.fetch
    monkeypatch.setattr(
        orbax_restore.Item,
        "fetch",
        lambda self, arrays: orbax_counter.hand_out(original_fetch(self, arrays)),
    )
    fmt = {"ckpt": "orbax", "out.msgpack": "msgpack"}.get(target, "safetensors")
    out = bridge.save(checkpoint, tmp_path / "from_orbax" / target, format=fmt, batch_bytes=batch)
    assert orbax_counter.reads == len(tensors)
    assert batch // 2 < orbax_counter.peak <= batch + largest

    file = tmp_path / "in.safetensors"
    safetensors.numpy.save_file(tensors, file)
    file_counter = InFlight()
    original_read = safetensors_format.SafetensorsArray.read
    monkeypatch.setattr(
        safetensors_format.SafetensorsArray,
        "read",
        lambda self, index=...: file_counter.hand_out([original_read(self, index)])[0],
    )
    bridge.save(file, tmp_path / "from_file" / target, format=fmt, batch_bytes=batch)
    assert file_counter.reads >= len(tensors)
    assert file_counter.peak <= batch + largest
    assert bridge.inspect(out).nbytes == sum(array.nbytes for array in tensors.values())


def test_one_progress_bar_covers_a_sharded_conversion(tmp_path, monkeypatch, llama):
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.done = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def set_postfix_str(self, *args, **kwargs):
            pass

        def update(self, nbytes):
            self.done += nbytes

    monkeypatch.setattr(progress, "tqdm", Bar)
    _, directory = llama
    for fmt, target, options in [
        ("safetensors", "hf", {"max_shard_size": "30KB"}),
        ("orbax", "ckpt", {"batch_bytes": SMALL_BATCH, "template": nnx_template()}),
    ]:
        bars.clear()
        bridge.save(directory, tmp_path / target, format=fmt, progress=True, **options)
        total = bridge.inspect(directory).nbytes
        assert [(bar.total, bar.done) for bar in bars] == [(total, total)]


def test_batch_bytes_must_be_a_positive_size(tmp_path):
    file = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file(many_tensors(), file)
    for wrong in (0, -1, "many", True, 1.5):
        with pytest.raises(FormatError, match="batch_bytes"):
            bridge.save(file, tmp_path / "ckpt", format="orbax", batch_bytes=wrong)
    assert not (tmp_path / "ckpt").exists()


# --- the command line and atomic outputs -------------------------------------------------


def _env() -> dict[str, str]:
    import os

    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }


def test_cli_converts_a_file_into_a_checkpoint_in_batches(tmp_path):
    directory = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file(many_tensors(), directory)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge.cli",
            "convert",
            str(directory),
            str(tmp_path / "ckpt"),
            "--to",
            "orbax",
            "--batch-size",
            "20KB",
            "--json",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bytes"] == bridge.inspect(directory).nbytes
    standard = jax.tree.leaves(restored(tmp_path / "ckpt"))  # a standard checkpoint
    assert sorted(a.tobytes() for a in standard) == sorted(
        a.tobytes() for a in many_tensors().values()
    )
    assert_trees_equal(
        {k: v for k, v in sorted(bridge.convert(directory, to="torch").items())},
        {k: v for k, v in sorted(bridge.convert(str(tmp_path / "ckpt"), to="torch").items())},
    )


KILLED = textwrap.dedent(
    """
    import sys, time
    from orbax.checkpoint import type_handlers
    import bridge

    original, calls = type_handlers.NumpyHandler._background_serialize, []


    async def write_then_hang(*args, **kwargs):  # the second batch is written, then a hang
        await original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            print("stuck", flush=True)
            time.sleep(3600)


    type_handlers.NumpyHandler._background_serialize = write_then_hang
    bridge.save(sys.argv[1], sys.argv[2], format="orbax", batch_bytes=20_000, overwrite=True)
    """
)


def test_a_killed_streamed_conversion_leaves_no_half_checkpoint(tmp_path):
    directory = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file(many_tensors(), directory)
    target = tmp_path / "out" / "ckpt"
    old = {"w": np.zeros(3, np.float32)}
    bridge.save(old, target, format="orbax", source="torch")
    before = sorted(p.relative_to(target).as_posix() for p in target.rglob("*"))
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    process = subprocess.Popen(
        [sys.executable, str(script), str(directory), str(target)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.strip() == "stuck", (
            process.stderr.read() if process.poll() is not None else line
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == before
    assert_trees_equal(restored(target), old)
    left = [p.name for p in target.parent.iterdir() if LEFTOVER.fullmatch(p.name)]
    assert left  # the killed conversion's temporary, holding its half checkpoint
    bridge.save(directory, target, format="orbax", overwrite=True, batch_bytes=SMALL_BATCH)
    assert [p.name for p in target.parent.iterdir()] == ["ckpt"]  # swept by the next save


def test_a_read_failing_mid_conversion_into_orbax_is_its_typed_error(tmp_path, monkeypatch):
    """The file is read inside Orbax's save (in its background thread): a read that
    fails there still reaches the caller as bridge's own error, nothing left behind."""
    file = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file(many_tensors(), file)
    original, reads = safetensors_format.SafetensorsArray.read, []

    def failing_read(self, index=...):
        reads.append(1)
        if len(reads) == 5:
            raise FormatError(f"{file}: cut short")
        return original(self, index)

    monkeypatch.setattr(safetensors_format.SafetensorsArray, "read", failing_read)
    with pytest.raises(FormatError, match="cut short"):
        bridge.save(file, tmp_path / "out" / "ckpt", format="orbax", batch_bytes=SMALL_BATCH)
    assert len(reads) == 5
    assert list((tmp_path / "out").iterdir()) == []
