"""Hostile input ends in a typed error: nesting bombs, absurd shapes, odd keys, values of
the wrong type, tampered descriptions and bad options are `BridgeError`s that name the
file and the key, raised before anything large is allocated."""

from __future__ import annotations

import datetime
import importlib
import json
import re
import shutil
import struct
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from conftest import assert_same_arrays
from flax import nnx, serialization

import bridge
from bridge.errors import FormatError
from bridge.graph import GRAPH

if "torch" not in GRAPH.formats:  # the edges to torch need the torch format registered
    importlib.import_module("bridge.formats.torch")
st = importlib.import_module("bridge.formats.safetensors")

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _safetensors(path: Path, header: bytes | dict, data: bytes = b"") -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def _one_tensor(path: Path, shape: list[int], data: bytes = b"") -> Path:
    """A file whose one F32 tensor `t` has `shape` and `data`, whatever they say."""
    return _safetensors(
        path, {"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, len(data)]}}, data
    )


def _every_reading(source) -> list:
    """Each way a user reads a file: inspect, plan, convert to torch and to NNX."""
    return [
        lambda: bridge.inspect(source),
        lambda: bridge.plan(source, to="nnx_state"),
        lambda: bridge.convert(source, to="torch"),
        lambda: bridge.convert(source, to="nnx_state"),
    ]


# --- nesting bombs ----------------------------------------------------------------------

BOMBS = {
    "arrays": b"[" * 2000 + b"]" * 2000,
    "objects": b'{"a":' * 2000 + b"1" + b"}" * 2000,
    "in a tensor": b'{"t": ' + b"[" * 900 + b"]" * 900 + b"}",
    "in __metadata__": b'{"__metadata__": {"a": ' + b"[" * 900 + b"]" * 900 + b"}}",
}


@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
def test_a_nesting_bomb_in_a_safetensors_header_is_a_format_error(tmp_path, bomb):
    file = _safetensors(tmp_path / "bomb.safetensors", bomb)
    for read in _every_reading(file):
        with pytest.raises(FormatError, match=f"^{file}: ") as error:
            read()
        assert len(str(error.value)) < 500  # the hostile value is not echoed in full


@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
def test_a_nesting_bomb_in_an_index_is_a_format_error(tmp_path, bomb):
    (tmp_path / st.INDEX_FILE).write_bytes(bomb)
    for read in _every_reading(tmp_path):
        with pytest.raises(FormatError, match=f"^{tmp_path / st.INDEX_FILE}: "):
            read()


@pytest.mark.parametrize("depth", [200, 1000, 1020])
def test_msgpack_maps_nested_deep_are_a_format_error(tmp_path, depth):
    data = b"\x81\xa1a" * depth + b"\x01"  # {"a": {"a": ... 1}}
    file = tmp_path / "deep.msgpack"
    file.write_bytes(data)
    for read in _every_reading(file):
        with pytest.raises(FormatError, match=f"^{file}: .*(deep|nest)"):
            read()


def test_msgpack_nested_as_deep_as_a_model_is_read():
    tree: dict = {"w": np.ones(2, np.float32)}
    for _ in range(40):
        tree = {"m": tree}
    state = bridge.convert(serialization.to_bytes(tree), to="nnx_state")
    assert len(nnx.to_flat_state(state)[0][0]) == 41


# --- shapes -----------------------------------------------------------------------------

SHAPES = {
    "a dimension of 2**63": ([2**63, 0], "multiply past 2\\*\\*63 bytes"),
    "a dimension of 2**64": ([2**64, 0], "multiply past 2\\*\\*63 bytes"),
    "65 dimensions": ([1] * 65, "65 dimensions, at most 64"),
    "65 empty dimensions": ([0] * 65, "65 dimensions, at most 64"),
    "a product past int64": ([2**32, 2**32, 0], "multiply past 2\\*\\*63 bytes"),
    "a product past int64 bytes": ([2**31, 2**31], "multiply past 2\\*\\*63 bytes"),
}


@pytest.mark.parametrize(("shape", "message"), SHAPES.values(), ids=SHAPES.keys())
def test_absurd_shapes_are_refused_from_the_header(tmp_path, shape, message):
    data = b"\0" * 4 if 0 not in shape else b""
    file = _one_tensor(tmp_path / "shape.safetensors", shape, data)
    for read in _every_reading(file):
        with pytest.raises(FormatError, match=f"^{file}: tensor 't': shape .* {message}"):
            read()


def test_the_largest_empty_shapes_numpy_makes_are_read(tmp_path):
    shape = [2**61 - 1, 0]  # times 4 bytes, just under what numpy can address
    file = _one_tensor(tmp_path / "empty.safetensors", shape)
    assert bridge.inspect(file).rows[0].shape == tuple(shape)
    assert tuple(bridge.convert(file, to="torch")["t"].shape) == tuple(shape)


def test_a_header_claiming_2_40_elements_is_refused_before_allocating(tmp_path):
    file = _one_tensor(tmp_path / "huge.safetensors", [2**40], b"\0" * 4)
    tracemalloc.start()
    try:
        for read in _every_reading(file):
            with pytest.raises(FormatError, match=f"^{file}: tensor 't': .* needs 4398046511104"):
                read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


# --- keys -------------------------------------------------------------------------------


def test_a_key_with_a_superscript_digit_is_a_name_and_converts(tmp_path):
    header = {"l.²": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    file = _safetensors(tmp_path / "sup.safetensors", header, np.float32(1).tobytes())
    assert [row.target for row in bridge.inspect(file).rows] == ["l.²"]
    assert bridge.convert(file, to="torch")["l.²"].tolist() == [1.0]
    state = bridge.convert(file, to="nnx_state")
    assert nnx.to_flat_state(state)[0][0] == ("l", "²")


def _leaf_and_parent(tmp_path) -> Path:
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "a.b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    }
    return _safetensors(tmp_path / "ab.safetensors", header, b"\0" * 8)


def test_a_flat_file_holding_a_and_a_b_stays_flat_and_is_refused_by_nested_formats(tmp_path):
    file = _leaf_and_parent(tmp_path)
    assert sorted(bridge.convert(file, to="torch")) == ["a", "a.b"]
    out = bridge.convert(file, to="safetensors", path=tmp_path / "copy.safetensors")
    assert [row.target for row in bridge.inspect(out).rows] == ["a", "a.b"]
    for to, first, second in [("nnx_state", "a", "a.b"), ("linen", "params/a", "params/a/b")]:
        with pytest.raises(
            FormatError,
            match=rf"^safetensors '{file}' -> {to}: '{first}' is both a leaf and the parent of "
            rf"'{second}'",
        ):
            bridge.convert(file, to=to)
    torch.save({"a": torch.zeros(1), "a.b": torch.zeros(1)}, tmp_path / "ab.pt")
    with pytest.raises(FormatError, match=r"'a' is both a leaf and the parent of 'a\.b'"):
        bridge.convert(tmp_path / "ab.pt", to="nnx_state")


def test_a_node_holding_a_position_and_a_name_is_refused_naming_both():
    state = {"h.1.w": np.ones(1, np.float32), "h.01.w": np.ones(1, np.float32)}
    with pytest.raises(FormatError, match=r"'h\.01\.w' and 'h\.1\.w': .* one node \(h\)"):
        bridge.convert(state, to="nnx_state", source="torch")


@pytest.mark.parametrize("key", [0, 1.5, None, (1, 2), b"w"])
def test_a_pt_file_with_keys_that_are_not_strings_is_refused_naming_it(tmp_path, key):
    file = tmp_path / "keys.pt"
    torch.save({"ok": torch.zeros(1), key: torch.zeros(2)}, file)
    for read in _every_reading(file):
        with pytest.raises(FormatError, match=rf"^{file}: key {re.escape(repr(key))} is of type"):
            read()
    with pytest.raises(FormatError, match=r"^the state_dict: key"):
        bridge.convert({key: np.zeros(2)}, to="nnx_state", source="torch")


# --- values of the wrong type -----------------------------------------------------------

WRONG_VALUES = {
    "a string": "adam",
    "bytes": b"\x00\x01",
    "a msgpack timestamp": msgpack.Timestamp(1, 0),
    "a datetime": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    "a datetime64 array": np.array(["2024-01-01"], "datetime64[s]"),
}


def _pack(value) -> bytes:
    if isinstance(value, np.ndarray):
        return serialization.msgpack_serialize({"params": {"w": value}})
    return msgpack.packb({"params": {"w": value}}, datetime=True)


@pytest.mark.parametrize("value", WRONG_VALUES.values(), ids=WRONG_VALUES.keys())
def test_msgpack_values_that_are_not_numbers_are_refused_where_arrays_are_expected(tmp_path, value):
    file = tmp_path / "wrong.msgpack"
    file.write_bytes(_pack(value))
    for to in ("nnx_state", "linen", "torch"):
        with pytest.raises(FormatError, match=rf"{file}\b.*'params/w'|{file}\b.*'w'"):
            bridge.convert(file, to=to)


def test_strings_stay_readable_where_no_array_is_expected(tmp_path):
    data = serialization.to_bytes({"name": "adam", "w": np.ones(2, np.float32)})
    assert serialization.msgpack_restore(bridge.convert(data, to="msgpack"))["name"] == "adam"


@pytest.mark.parametrize("dtype", [">f4", ">i4", ">c8"])
def test_big_endian_arrays_are_placed_in_native_byte_order_with_the_same_values(dtype):
    values = np.arange(6).reshape(2, 3).astype(dtype)
    native = values.astype(values.dtype.newbyteorder("="))
    with nnx.use_eager_sharding(False):
        state = nnx.State({"layer": {"w": nnx.Param(values)}})
    ours = bridge.convert(state, to="nnx_state")
    assert_same_arrays(ours["layer"]["w"].get_value(), native)
    assert_same_arrays(bridge.convert(state, to="linen")["params"]["layer"]["w"], native)
    assert_same_arrays(bridge.convert(state, to="torch")["layer.w"].numpy(), native)
    assert values.dtype == np.dtype(dtype)  # the input is not converted in place


# --- a tampered Orbax description -------------------------------------------------------

KERNEL = "layers.0.kernel"
TAMPERED = {
    "an unknown layout": (lambda d: d.update(layout="sideways"), "layout 'sideways'"),
    "no layout": (lambda d: d.pop("layout"), "lacks layout"),
    "an unknown field": (lambda d: d.update(extra=1), r"unknown fields \['extra'\]"),
    "a list": (lambda d: d.clear(), "lacks bridge_version, layout, leaves, source"),
    "a record that is a number": (
        lambda d: d["leaves"].update({KERNEL: 5}),
        f"{KERNEL}' is a int",
    ),
    "a kind that is a number": (lambda d: d["leaves"][KERNEL].update(kind=5), "kind=5"),
    "no kind": (lambda d: d["leaves"][KERNEL].pop("kind"), "lacks kind"),
    "ints on a name": (lambda d: d["leaves"][KERNEL].update(ints=[0]), r"ints=\[0\]"),
    "ints past the path": (lambda d: d["leaves"][KERNEL].update(ints=[7]), r"ints=\[7\]"),
    "ints below zero": (lambda d: d["leaves"][KERNEL].update(ints=[-2]), r"ints=\[-2\]"),
    "ints as strings": (lambda d: d["leaves"][KERNEL].update(ints=["1"]), r"ints=\['1'\]"),
    "ints as bools": (lambda d: d["leaves"][KERNEL].update(ints=[True]), r"ints=\[True\]"),
    "ints not a list": (lambda d: d["leaves"][KERNEL].update(ints=1), "ints=1"),
    "metadata not an object": (lambda d: d["leaves"][KERNEL].update(metadata="x"), "metadata="),
    "metadata named value": (
        lambda d: d["leaves"][KERNEL].update(metadata={"value": 1}),
        r"metadata \['value'\]",
    ),
    "metadata nested deep": (
        lambda d: d["leaves"][KERNEL].update(metadata={"x": json.loads("[" * 900 + "]" * 900)}),
        "nested too deep",
    ),
    "transient not a bool": (
        lambda d: d["leaves"][KERNEL].update(transient="yes"),
        "transient='yes'",
    ),
    "key not a bool": (lambda d: d["leaves"][KERNEL].update(key=1), "key=1"),
    "a record field unknown": (lambda d: d["leaves"][KERNEL].update(z=1), r"unknown fields"),
    "a record missing": (lambda d: d["leaves"].pop(KERNEL), "disagree"),
    "the layout of another tree": (
        lambda d: d.update(layout="collection-first"),
        "has kind 'params', but is stored under 'layers'",
    ),
}


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    with nnx.use_eager_sharding(False):
        state = nnx.State({"layers": {0: {"kernel": nnx.Param(np.ones((2, 2), np.float32))}}})
    return bridge.save(state, tmp_path_factory.mktemp("orbax") / "ckpt", format="orbax")


@pytest.mark.parametrize(("tamper", "message"), TAMPERED.values(), ids=TAMPERED.keys())
def test_a_tampered_orbax_description_is_refused_naming_the_entry(
    tmp_path, saved_checkpoint, tamper, message
):
    path = shutil.copytree(saved_checkpoint, tmp_path / "ckpt")
    step_metadata = json.loads((path / "_CHECKPOINT_METADATA").read_text())
    tamper(step_metadata["custom_metadata"]["bridge"])
    (path / "_CHECKPOINT_METADATA").write_text(json.dumps(step_metadata))
    for to in ("nnx_state", "linen"):
        with pytest.raises(FormatError, match=rf"^{path}\b.*{message}.*changed after bridge"):
            bridge.convert(path, to=to)


def test_a_collection_first_description_must_agree_with_where_arrays_are(tmp_path):
    path = bridge.save({"params": {"w": np.ones(2, np.float32)}}, tmp_path / "c", format="orbax")
    step_metadata = json.loads((path / "_CHECKPOINT_METADATA").read_text())
    step_metadata["custom_metadata"]["bridge"]["leaves"]["params.w"]["kind"] = "batch_stats"
    (path / "_CHECKPOINT_METADATA").write_text(json.dumps(step_metadata))
    with pytest.raises(FormatError, match=r"'params\.w' has kind 'batch_stats', but is stored"):
        bridge.convert(path, to="linen")


# --- options ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["infGB", "-infGB", "nanGB", "1e400GB", "0GB", "-1GB", "0.0001KB"])
def test_a_max_shard_size_that_is_no_positive_finite_size_is_refused(tmp_path, size):
    with pytest.raises(FormatError, match=r"^max_shard_size="):
        bridge.save({"w": np.ones(3)}, tmp_path / "out", format="safetensors", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []


def test_a_huge_max_shard_size_is_one_shard(tmp_path):
    out = bridge.save(
        {"w": np.ones(3)}, tmp_path / "o", format="safetensors", max_shard_size=10**400
    )
    assert [p.name for p in out.iterdir()] == [st.SINGLE_FILE]


STATE = {"w.weight": np.array([1.7, -2.6, 300.0], np.float32), "n": np.array([3], np.int64)}


@pytest.mark.parametrize("dtype", ["int8", np.uint8, bool, "int32"])
def test_dtype_casts_to_integer_or_bool_only_when_asked(dtype):
    with pytest.raises(FormatError, match=r"dtype=.*casting='unsafe'"):
        bridge.convert(STATE, to="torch", source="torch", dtype=dtype)
    with pytest.raises(FormatError, match=r"casting='unsafe'"):
        bridge.plan(STATE, to="torch", source="torch", dtype=dtype)
    out = bridge.convert(STATE, to="torch", source="torch", dtype=dtype, casting="unsafe")
    assert out["w.weight"].numpy().dtype == np.dtype(dtype)
    assert out["n"].dtype == torch.int64  # integer leaves are never cast


def test_dtype_casts_between_floating_types_and_refuses_what_is_no_dtype():
    out = bridge.convert(STATE, to="torch", source="torch", dtype="bfloat16")
    assert out["w.weight"].dtype == torch.bfloat16 and out["n"].dtype == torch.int64
    with pytest.raises(FormatError, match=r"^dtype='junk': not a dtype"):
        bridge.convert(STATE, to="torch", source="torch", dtype="junk")
    with pytest.raises(FormatError, match=r"^casting='same-kind': expected one of"):
        bridge.convert(STATE, to="torch", source="torch", dtype="float16", casting="same-kind")
