"""The safetensors adapter: reading files of the real library bit-exactly and lazily,
writing files and HF shard directories that the library and `transformers` load,
refusing corrupt input with messages that say where, and writing atomically."""

from __future__ import annotations

import ast
import importlib
import json
import os
import struct
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from huggingface_hub.serialization._base import parse_size_to_int

import bridge
from bridge.errors import FormatError, OutputExistsError
from bridge.graph import GRAPH, Context
from bridge.stream import parse_size
from bridge.tree import LazyArray, Leaf, dotted, parse_dotted

if "torch" not in GRAPH.formats:  # the edges to torch need the torch format registered
    importlib.import_module("bridge.formats.torch")
st = importlib.import_module("bridge.formats.safetensors")

FORMAT = GRAPH.format("safetensors")


def _read(path) -> dict[str, np.ndarray]:
    return {dotted(p): np.asarray(leaf.value) for p, leaf in st.read(path, Context()).items()}


def _write(arrays: dict[str, object], path, **options) -> Path:
    flat = {parse_dotted(key): Leaf(value) for key, value in arrays.items()}
    return st.write(flat, Context(options={"path": path, **options}))


def _torch_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    assert ours.tobytes() == expected.tobytes()


def _safetensors_file(header: object, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _torch_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(3, 5, generator=gen)
    return {
        "transformer.h.0.attn.c_attn.weight": normal,
        "f64": torch.randn(4, generator=gen, dtype=torch.float64),
        "f16": normal.half(),
        "bf16": (normal * 1e3).bfloat16(),
        "fp8.e4m3": normal.to(torch.float8_e4m3fn),
        "fp8.e5m2": normal.to(torch.float8_e5m2),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 5]),
        "i32": torch.tensor([-7, 7], dtype=torch.int32),
        "i16": torch.tensor([-300], dtype=torch.int16),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 5),
    }


NUMPY_DTYPE = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    torch.float8_e5m2: ml_dtypes.float8_e5m2,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


@pytest.mark.parametrize("through_graph", [False, True])
def test_reads_files_of_the_safetensors_library_bit_exactly(tmp_path, through_graph):
    tensors = _torch_tensors()
    file = tmp_path / "lib.safetensors"
    safetensors.torch.save_file(tensors, file)
    reader = FORMAT.read if through_graph else st.read
    flat = reader(str(file), Context())
    assert set(flat) == {parse_dotted(key) for key in tensors}
    assert ("transformer", "h", 0, "attn", "c_attn", "weight") in flat
    for key, tensor in tensors.items():
        lazy = flat[parse_dotted(key)].value
        assert isinstance(lazy, LazyArray)
        assert lazy.shape == tuple(tensor.shape) and lazy.dtype == NUMPY_DTYPE[tensor.dtype]
        array = np.asarray(lazy)
        assert array.dtype == NUMPY_DTYPE[tensor.dtype] and array.shape == tuple(tensor.shape)
        assert array.tobytes() == _torch_bytes(tensor), key


def test_write_then_read_is_bit_exact_and_the_library_reads_it(tmp_path):
    bits = np.array([0x7FC1, 0xFF80, 0x0001, 0x8000, 0x3F80], np.uint16)  # NaN payload, -inf, ...
    lazy_source = tmp_path / "source.safetensors"
    safetensors.torch.save_file({"w": torch.arange(6.0).reshape(2, 3)}, lazy_source)
    arrays = {
        "bf16.nan_payloads": bits.view(ml_dtypes.bfloat16),
        "fp8.e4m3": np.arange(-8, 8, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
        "fp8.e5m2": np.linspace(-2, 2, 7).astype(ml_dtypes.float8_e5m2),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
        "big_endian": np.arange(3, dtype=">i4"),
        "jax.bf16": jnp.linspace(0, 1, 5, dtype=jnp.bfloat16),
        "lazy": st.read(lazy_source, Context())[("w",)].value,
        "scalar": np.float16(1.5),
        "empty": np.zeros((0, 4), np.int64),
        "mask": np.array([True, False]),
    }
    expected = {
        "bf16.nan_payloads": bits.view(ml_dtypes.bfloat16),
        "fp8.e4m3": np.arange(-8, 8, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
        "fp8.e5m2": np.linspace(-2, 2, 7).astype(ml_dtypes.float8_e5m2),
        "transposed": np.ascontiguousarray(np.arange(12, dtype=np.float32).reshape(3, 4).T),
        "big_endian": np.arange(3, dtype="<i4"),
        "jax.bf16": np.asarray(jnp.linspace(0, 1, 5, dtype=jnp.bfloat16)),
        "lazy": np.arange(6.0, dtype=np.float32).reshape(2, 3),
        "scalar": np.array(1.5, np.float16),
        "empty": np.zeros((0, 4), np.int64),
        "mask": np.array([True, False]),
    }
    out = tmp_path / "out.safetensors"
    assert _write(arrays, out) == out
    ours = _read(out)
    assert ours.keys() == expected.keys()
    for key, array in expected.items():
        _assert_same(ours[key], array)
    with safetensors.safe_open(out, "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for key, array in expected.items():
            tensor = handle.get_tensor(key)
            assert tuple(tensor.shape) == array.shape and _torch_bytes(tensor) == array.tobytes()


@pytest.mark.parametrize("names", [1, 3, 7])  # header lengths that need different padding
def test_written_files_are_byte_identical_to_the_library_s(tmp_path, names):
    rng = np.random.default_rng(names)
    arrays = {}
    for rank, dtype in enumerate(st.DTYPES.values()):  # every dtype; names that sort apart
        for i in range(names):
            letters = list('ab.é_0Z"\\\n\x01\x7f\u2028😀')  # JSON escapes and non-ASCII
            name = "".join(rng.choice(letters, size=1 + (rank + i) % 6)) + f"{rank}/{i}"
            arrays[name] = rng.integers(0, 2, size=(i % 3, 2, i + 1)[: i % 4]).astype(dtype)
    arrays["big_endian"] = np.arange(3, dtype=">i4")
    library = tmp_path / "library.safetensors"
    safetensors.numpy.save_file(arrays, library, metadata={"format": "pt"})
    ours = _write(arrays, tmp_path / "ours.safetensors")
    assert ours.read_bytes() == library.read_bytes()


def test_a_file_is_written_one_tensor_at_a_time(tmp_path):
    count, size = 8, 4 * 2**20

    class Generated(LazyArray):
        """Made only when read, as a transposed or cast tensor is."""

        shape, dtype = (size // 4,), np.dtype(np.float32)

        def __init__(self, seed):
            self.seed = seed

        def read(self, index=...):
            return np.full(self.shape, self.seed, self.dtype)[index]

    tracemalloc.start()
    try:
        _write({f"t{i}": Generated(i) for i in range(count)}, tmp_path / "o.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size <= peak < 2 * size  # one tensor, not the file's eight
    for key, array in _read(tmp_path / "o.safetensors").items():
        assert (array == int(key[1:])).all() and array.shape == (size // 4,)


def test_sharded_write_is_read_back_by_the_library_and_by_us(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"layers.{i}.weight": rng.normal(size=(10, 10)).astype(np.float32) for i in range(5)}
    arrays["layers.0.bias"] = rng.normal(size=10).astype(ml_dtypes.bfloat16)
    out = FORMAT.write(
        {parse_dotted(k): Leaf(v) for k, v in arrays.items()},
        Context(options={"path": tmp_path / "out", "max_shard_size": 900}),
    )
    index = json.loads((out / st.INDEX_FILE).read_text())
    first, second, third = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
    assert index["weight_map"] == {  # 2 x 400 B fit in 900 B, a third does not
        "layers.0.weight": first,
        "layers.1.weight": first,
        "layers.2.weight": second,
        "layers.3.weight": second,
        "layers.4.weight": third,
        "layers.0.bias": third,
    }
    seen: dict[str, str] = {}
    for name in sorted(set(index["weight_map"].values())):
        with safetensors.safe_open(out / name, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for key in handle.keys():  # noqa: SIM118  (safe_open is no mapping)
                assert key not in seen
                seen[key] = name
                assert _torch_bytes(handle.get_tensor(key)) == arrays[key].tobytes()
    assert seen == index["weight_map"]
    ours = _read(out)
    assert ours.keys() == arrays.keys()
    for key, array in arrays.items():
        _assert_same(ours[key], array)


@pytest.mark.parametrize(
    "limit", [10_000, "10KB", "0.01MB", " 10kb ", 3_000, 100, 10**12, "5GB", "0.0032MB"]
)
def test_shards_are_laid_out_as_huggingface_hub_lays_them_out(tmp_path, limit):
    sizes = [4_000, 4_000, 2_500, 12_000, 100, 3_000, 8_000]  # one is larger than most limits
    arrays = {f"t.{i}": np.zeros(size // 4, np.float32) for i, size in enumerate(sizes)}
    if isinstance(limit, str):
        assert parse_size(limit, "max_shard_size") == parse_size_to_int(limit)
    reference = split_state_dict_into_shards_factory(
        arrays,
        get_storage_size=lambda array: array.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=limit,
    )
    out = _write(arrays, tmp_path / "out", max_shard_size=limit)
    files = sorted(path.name for path in out.iterdir())
    assert files == sorted(reference.filename_to_tensors) + (
        [st.INDEX_FILE] if reference.is_sharded else []
    )
    for name, keys in reference.filename_to_tensors.items():
        with safetensors.safe_open(out / name, "np") as handle:
            assert sorted(handle.keys()) == sorted(keys)
    if reference.is_sharded:
        index = json.loads((out / st.INDEX_FILE).read_text())
        assert index == {"metadata": reference.metadata, "weight_map": reference.tensor_to_filename}
        assert list(index["weight_map"]) == sorted(index["weight_map"])


def test_without_max_shard_size_a_directory_gets_one_model_safetensors(tmp_path):
    out = _write({"a": np.ones(3, np.float32)}, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert _read(out)["a"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("size", ["5GiB", "GB", "abcMB", "-1KB", 0, -5, True, 2.5, "100"])
def test_bad_max_shard_size_is_refused_before_writing(tmp_path, size):
    with pytest.raises(FormatError, match="max_shard_size"):
        _write({"a": np.ones(3)}, tmp_path / "out", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []


def test_max_shard_size_with_a_file_path_is_refused(tmp_path):
    with pytest.raises(FormatError, match="directory"):
        _write({"a": np.ones(3)}, tmp_path / "x.safetensors", max_shard_size="1KB")


def test_transformers_loads_a_sharded_directory_written_here(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=50,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    state = model.state_dict()
    hf_dir, ours_dir = tmp_path / "hf", tmp_path / "ours"
    model.save_pretrained(hf_dir, max_shard_size="5KB")
    tied = "lm_head.weight"  # save_pretrained leaves the tied copy out; from_pretrained ties it
    assert state[tied].data_ptr() == state["transformer.wte.weight"].data_ptr()
    _write(
        {key: tensor.numpy() for key, tensor in state.items() if key != tied},
        ours_dir,
        max_shard_size="5KB",
    )
    config.save_pretrained(ours_dir)

    shards = sorted(path.name for path in ours_dir.glob("model-*.safetensors"))
    assert len(shards) == 5 and shards == sorted(p.name for p in hf_dir.glob("model-*"))
    for name in shards:  # the very bytes save_pretrained writes
        assert (ours_dir / name).read_bytes() == (hf_dir / name).read_bytes()
    ours_index = json.loads((ours_dir / st.INDEX_FILE).read_text())
    hf_index = json.loads((hf_dir / st.INDEX_FILE).read_text())
    hf_index["metadata"].pop("total_parameters")  # needs the model; from_pretrained ignores it
    assert ours_index == hf_index

    loaded = GPT2LMHeadModel.from_pretrained(ours_dir).state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    ours = _read(ours_dir)
    assert set(ours) == set(state) - {tied}
    for key, array in ours.items():
        assert array.tobytes() == _torch_bytes(state[key])


def test_a_slice_reads_only_its_bytes(tmp_path):
    full = np.arange(2048 * 1024, dtype=np.float32).reshape(2048, 1024)  # 8 MiB
    file = tmp_path / "big.safetensors"
    safetensors.torch.save_file({"big": torch.from_numpy(full), "small": torch.ones(2)}, file)
    lazy = st.read(file, Context())[("big",)].value

    tracemalloc.start()
    try:
        part = lazy[1:3]
        part_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        whole = np.asarray(lazy)
        whole_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _assert_same(part, full[1:3])
    _assert_same(whole, full)
    assert part_peak < 64 * 1024 < full.nbytes <= whole_peak  # the measure sees a full read
    _assert_same(lazy.read((slice(None, None, 512), 7)), full[::512, 7])


def test_read_arrays_are_copies_and_a_replaced_file_is_refused(tmp_path):
    file = tmp_path / "a.safetensors"
    safetensors.torch.save_file({"x": torch.arange(4.0)}, file)
    x = st.read(file, Context())[("x",)].value
    first = x.read()
    with open(file, "r+b") as handle:  # change the data in place, behind the reader's back
        handle.seek(-16, os.SEEK_END)
        handle.write(bytes(16))
    assert first.tolist() == [0, 1, 2, 3] and first.flags.writeable

    stale = st.read(file, Context())[("x",)].value
    safetensors.torch.save_file({"x": torch.arange(8.0)}, file)
    with pytest.raises(FormatError, match=r"a\.safetensors: the file changed"):
        stale.read()


def test_reading_leaves_the_input_untouched(tmp_path):
    file = tmp_path / "in.safetensors"
    safetensors.torch.save_file(_torch_tensors(), file)
    before = (file.read_bytes(), os.stat(file).st_mtime_ns, os.stat(file).st_mode)
    for leaf in st.read(file, Context()).values():
        np.asarray(leaf.value)
    assert (file.read_bytes(), os.stat(file).st_mtime_ns, os.stat(file).st_mode) == before


def test_writing_leaves_the_input_arrays_untouched(tmp_path):
    transposed = np.arange(6, dtype=">f4").reshape(2, 3).T
    copy = transposed.copy()
    _write({"t": transposed}, tmp_path / "o.safetensors")
    assert transposed.dtype == np.dtype(">f4") and not transposed.flags.c_contiguous
    np.testing.assert_array_equal(transposed, copy)


def _valid_parts() -> tuple[dict, bytes]:
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "I8", "shape": [4], "data_offsets": [16, 20]},
    }
    return header, np.arange(4, dtype=np.float32).tobytes() + bytes(range(4))


def _with(key: str, data: bytes | None = None, **changes) -> bytes:
    header, valid_data = _valid_parts()
    header[key] = {**header[key], **changes}
    return _safetensors_file(header, valid_data if data is None else data)


def _variant(name: str) -> bytes:
    header, data = _valid_parts()
    whole = _safetensors_file(header, data)
    header_len = len(whole) - len(data) - 8
    twice = b'"b":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}'
    return {
        "cut in the data": whole[:-3],
        "cut in the header": whole[: 8 + header_len // 2],
        "shorter than 8 bytes": whole[:5],
        "garbage header": struct.pack("<Q", 12) + b"\x00garbage!!\xff\xfe" + data,
        "huge header length": struct.pack("<Q", 2**62) + whole[8:],
        "header a JSON list": _safetensors_file([1, 2], data),
        "metadata not strings": _safetensors_file({**header, "__metadata__": {"a": 1}}, data),
        "entry not an object": _safetensors_file({**header, "w": [0, 16]}, data),
        "negative dim": _with("w", shape=[-2, -2]),
        "shape lies about size": _with("w", shape=[3, 2]),
        "offsets out of the file": _with("b", data_offsets=[16, 24], shape=[8]),
        "unknown dtype": _with("b", dtype="X9"),
        "overlap": _with("b", data_offsets=[12, 16]),
        "gap": _with("b", data[:16] + bytes(4) + data[16:], data_offsets=[20, 24]),
        "trailing bytes": _safetensors_file(header, data + bytes(3)),
        "duplicate key": struct.pack("<Q", 2 * len(twice) + 3)
        + b"{"
        + twice
        + b","
        + twice
        + b"}"
        + bytes(4),
    }[name]


@pytest.mark.parametrize(
    ("name", "says", "library_refuses"),
    [
        ("cut in the data", r"tensor 'b'.*\[16, 20\].*out of the file", True),
        ("cut in the header", r"header length at offset 0 says \d+ bytes", True),
        ("shorter than 8 bytes", r"5 bytes, too short", True),
        ("garbage header", r"header at offset 8 is not JSON", True),
        ("huge header length", r"header length at offset 0 says", True),
        ("header a JSON list", r"a JSON list, expected an object", True),
        ("metadata not strings", r"__metadata__ must map strings to strings", True),
        ("entry not an object", r"tensor 'w': expected \{dtype", True),
        ("negative dim", r"tensor 'w': expected", True),
        ("shape lies about size", r"tensor 'w'.*hold 16 bytes, but F32 \[3, 2\] needs 24", True),
        ("offsets out of the file", r"tensor 'b'.*\[16, 24\].*out of the file", True),
        ("unknown dtype", r"tensor 'b': unsupported dtype 'X9'", True),
        ("overlap", r"tensor 'b'.*overlaps tensor 'w'", True),
        ("gap", r"tensor 'b' starts at data offset 20, expected 16", True),
        ("trailing bytes", r"goes on for 3 more bytes", True),
        ("duplicate key", r"key 'b' appears twice", False),
    ],
)
def test_corrupt_files_are_refused_with_file_key_and_offset(tmp_path, name, says, library_refuses):
    file = tmp_path / "bad.safetensors"
    file.write_bytes(_variant(name))
    with pytest.raises(FormatError, match=says) as caught:
        st.read(file, Context())
    assert str(caught.value).startswith(f"{file}:")
    if library_refuses:  # our rules are the library's, not stricter
        with pytest.raises(Exception):  # noqa: B017  (SafetensorError, or OSError for short files)
            safetensors.safe_open(file, "np")


def test_the_good_file_behind_the_corrupt_variants_is_valid(tmp_path):
    file = tmp_path / "good.safetensors"
    file.write_bytes(_safetensors_file(*_valid_parts()))
    assert _read(file)["b"].tolist() == [0, 1, 2, 3]
    with safetensors.safe_open(file, "np") as handle:
        assert sorted(handle.keys()) == ["b", "w"]


def _sharded_dir(tmp_path: Path) -> Path:
    arrays = {"a": np.ones(100, np.float32), "b": np.zeros(100, np.float32), "c": np.ones(5)}
    return _write(arrays, tmp_path / "sharded", max_shard_size=500)


def _edit_index(directory: Path, edit) -> None:
    index_file = directory / st.INDEX_FILE
    index = json.loads(index_file.read_text())
    edit(index["weight_map"])
    index_file.write_text(json.dumps(index))


def test_sharded_dir_checks_index_against_shards(tmp_path):
    directory = _sharded_dir(tmp_path)
    index = json.loads((directory / st.INDEX_FILE).read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    assert sorted(_read(directory)) == ["a", "b", "c"]

    _edit_index(directory, lambda wm: wm.update(b="model-00009-of-00009.safetensors"))
    with pytest.raises(FormatError, match=r"shard 'model-00009-of-00009\.safetensors' does not"):
        st.read(directory, Context())

    _edit_index(directory, lambda wm: wm.update(b=wm["c"], d=wm["c"]))
    with pytest.raises(FormatError, match=r"tensor 'd' is listed in shard 'model-00002.*not in"):
        st.read(directory, Context())

    _edit_index(directory, lambda wm: [wm.pop("d"), wm.pop("c")])
    with pytest.raises(FormatError, match=r"model-00002-of-00002\.safetensors: tensor 'c' is in"):
        st.read(directory, Context())

    _edit_index(directory, lambda wm: wm.update(c="model-00001-of-00002.safetensors"))
    with pytest.raises(FormatError, match=r"tensor 'c'.*puts it in 'model-00001"):
        st.read(directory, Context())


def test_sharded_dir_refuses_a_key_in_two_shards(tmp_path):
    directory = _sharded_dir(tmp_path)
    first = directory / "model-00001-of-00002.safetensors"
    first.unlink()
    safetensors.torch.save_file({"a": torch.ones(100), "c": torch.ones(5)}, first)
    with pytest.raises(
        FormatError,
        match=r"tensor 'c' is in both 'model-00002-of-00002\.safetensors' and 'model-00001",
    ):
        st.read(directory, Context())


@pytest.mark.parametrize(
    "index", ["{not json", '{"weight_map": ["a"]}', '{"weight_map": {"a": "../x"}}']
)
def test_a_bad_index_is_refused(tmp_path, index):
    directory = _sharded_dir(tmp_path)
    (directory / st.INDEX_FILE).write_text(index)
    with pytest.raises(FormatError, match=r"model\.safetensors\.index\.json: "):
        st.read(directory, Context())


def test_a_directory_with_both_layouts_is_read_as_from_pretrained_reads_it(tmp_path):
    directory = _sharded_dir(tmp_path)
    safetensors.torch.save_file({"only": torch.ones(1)}, directory / "model.safetensors")
    ctx = Context()
    assert list(st.read(directory, ctx)) == [("only",)]
    assert any("model.safetensors.index.json" in note for note in ctx.report.notes)


def test_missing_paths_are_refused(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        st.read(tmp_path / "nope.safetensors", Context())
    with pytest.raises(FormatError, match=r"neither model\.safetensors nor"):
        st.read(tmp_path, Context())


@pytest.mark.parametrize("name", ["out.safetensors", "out_dir"])
def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, name):
    target = tmp_path / name
    _write({"x": np.zeros(2, np.float32)}, target)
    snapshot = _read(target)
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        _write({"x": np.ones(2, np.float32)}, target)
    _assert_same(_read(target)["x"], snapshot["x"])
    _write({"x": np.ones(2, np.float32)}, target, overwrite=True)
    assert _read(target)["x"].tolist() == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_an_empty_existing_directory_is_written_into(tmp_path):
    _write({"x": np.ones(2)}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


class _FailingArray(LazyArray):
    shape, dtype = (100,), np.dtype(np.float32)

    def read(self, index=...):
        raise OSError("disk went away")


@pytest.mark.parametrize("name", ["out.safetensors", "out_dir"])
def test_a_failing_write_leaves_nothing_behind(tmp_path, name):
    with pytest.raises(FormatError, match=r"'bad': safetensors cannot hold dtype <U1"):
        _write({"good": np.ones(3), "bad": np.array(["a"])}, tmp_path / name)
    with pytest.raises(FormatError, match=r"'bad' is abstract"):
        _write({"bad": jax.ShapeDtypeStruct((2,), jnp.float32)}, tmp_path / name)
    sharding = {"max_shard_size": 100} if name == "out_dir" else {}
    with pytest.raises(OSError, match="disk went away"):  # fails after a first shard is written
        _write(
            {"good": np.ones(50, np.float32), "late": _FailingArray()}, tmp_path / name, **sharding
        )
    assert list(tmp_path.iterdir()) == []


def test_a_failing_overwrite_keeps_the_old_output(tmp_path):
    target = tmp_path / "out_dir"
    _write({"x": np.zeros(2)}, target, max_shard_size=10)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(OSError, match="disk went away"):
        _write({"late": _FailingArray()}, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out_dir"]


class _LyingArray(LazyArray):
    """Says float32, reads strings: the written dtype is checked on the data itself."""

    shape, dtype = (1,), np.dtype(np.float32)

    def read(self, index=...):
        return np.array(["a"])


class _Unreadable(LazyArray):
    shape, dtype = (1,), np.dtype(np.float32)

    def read(self, index=...):
        raise ValueError("no data here")


def test_values_are_checked_once_read(tmp_path):
    with pytest.raises(FormatError, match=r"'x': safetensors cannot hold dtype <U1"):
        _write({"x": _LyingArray()}, tmp_path / "a.safetensors")
    with pytest.raises(FormatError, match=r"'x': cannot make an array of _Unreadable: no data"):
        _write({"x": _Unreadable()}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


class _Resized(LazyArray):
    """Promises one shape and dtype in the header, reads another."""

    def __init__(self, shape, dtype, read_as):
        self.shape, self.dtype, self.read_as = shape, np.dtype(dtype), read_as

    def read(self, index=...):
        return self.read_as


@pytest.mark.parametrize(
    "lying",
    [
        _Resized((2,), np.float32, np.ones(3, np.float32)),
        _Resized((2,), np.float32, np.ones(2, np.float16)),
    ],
)
def test_a_value_unlike_its_leaf_is_refused(tmp_path, lying):
    with pytest.raises(FormatError, match=r"'x': the value read is float.*but the leaf said"):
        _write({"a": np.ones(1), "x": lying}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


class _NumpyShaped(LazyArray):
    """Declares its shape in numpy integers, as arithmetic on shapes gives them."""

    shape, dtype = (np.int64(2), np.int32(3)), np.dtype(np.float32)

    def read(self, index=...):
        return np.ones((2, 3), np.float32)[index]


def test_shapes_in_numpy_integers_are_written(tmp_path):
    _write({"x": _NumpyShaped()}, tmp_path / "a.safetensors")
    _assert_same(_read(tmp_path / "a.safetensors")["x"], np.ones((2, 3), np.float32))


@pytest.mark.parametrize(
    ("key", "says"),
    [("__metadata__", "cannot be named '__metadata__'"), ("bad\ud800", "no valid UTF-8")],
)
def test_names_a_header_cannot_hold_are_refused(tmp_path, key, says):
    with pytest.raises(FormatError, match=says):
        st.write({(key,): Leaf(np.ones(1))}, Context(options={"path": tmp_path / "o.safetensors"}))
    assert list(tmp_path.iterdir()) == []


def test_write_needs_a_path_and_distinct_keys(tmp_path):
    with pytest.raises(FormatError, match="needs path"):
        st.write({("a",): Leaf(np.ones(1))}, Context())
    clash = {("h", 0): Leaf(np.ones(1)), ("h", "0"): Leaf(np.ones(1))}
    with pytest.raises(FormatError, match=r"two leaves are spelled 'h\.0'"):
        st.write(clash, Context(options={"path": tmp_path / "o.safetensors"}))


def test_detect(tmp_path):
    file = tmp_path / "m.safetensors"
    _write({"x": np.ones(1)}, file)
    sharded, single = _sharded_dir(tmp_path), _write({"x": np.ones(1)}, tmp_path / "single")
    (tmp_path / "other.bin").write_bytes(b"x")
    for obj in (file, str(file), sharded, single):
        assert st.detect(obj) == 1.0 and bridge.detect(obj) == "safetensors"
    for obj in (tmp_path / "other.bin", tmp_path / "nope.safetensors", tmp_path, "x\0y", None, 3):
        assert st.detect(obj) == 0.0
    assert st.detect({"x": np.ones(1)}) == 0.0 and st.detect(bytes(file)) == 0.0


def test_registration():
    assert FORMAT.options == {"path", "overwrite", "max_shard_size", "config"}
    assert FORMAT.checkpoint_files  # a transformers template gives the Hub layout
    assert (FORMAT.read, FORMAT.write, FORMAT.detect) == (st.read, st.write, st.detect)
    to_torch, from_torch = GRAPH.edges["safetensors"]["torch"], GRAPH.edges["torch"]["safetensors"]
    assert (to_torch.cost, to_torch.needs, to_torch.lossy) == (1.0, frozenset(), False)
    assert (from_torch.cost, from_torch.needs, from_torch.lossy) == (1.0, {"path"}, False)


def test_the_module_needs_neither_torch_nor_the_safetensors_package():
    tree = ast.parse(Path(st.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "numpy" in imported
    assert not {name for name in imported if name and {"torch", "safetensors"} & {*name.split(".")}}
