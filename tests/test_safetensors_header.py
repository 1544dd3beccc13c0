"""The safetensors header checks at many tensors: the rules are checked over all tensors
at once, and where one fails the tensors are checked one by one to name the key; both
ways must accept and refuse exactly the same headers, with the same tensors, order and
messages, and a key given twice anywhere in the header is refused."""

from __future__ import annotations

import importlib
import json
import math
import struct
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import bridge
from bridge.errors import FormatError
from bridge.graph import Context
from bridge.tree import Leaf, parse_dotted

adapter = importlib.import_module("bridge.formats.safetensors")


def _file(path: Path, header: bytes | dict, data_len: int) -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_len))
    return path


def _outcome(path: Path) -> tuple:
    """What reading `path` gives: each tensor's key, dtype, shape and offset in order, or
    the error's type and message."""
    try:
        tensors = adapter.read_file(path)
    except FormatError as error:
        return ("refused", type(error), str(error))
    return (
        "read",
        [(key, a.dtype, a.shape, a.begin, a.file.data_start) for key, a in tensors.items()],
    )


def _one_by_one(path: Path) -> tuple:
    with mock.patch.object(adapter, "_all_at_once", return_value=None):
        return _outcome(path)


# --- all at once, one by one: the same verdicts ------------------------------------------

HOSTILE = st.one_of(
    st.integers(-2, 70),
    st.sampled_from([True, False, None, 1.0, "1", [1], {}, 2**31, 2**61, 2**62, 2**63, 2**64]),
)


@st.composite
def packed_headers(draw: st.DrawFn) -> tuple[dict, int]:
    """A header of 1-6 packed tensors (empty ones too) in any header order, and the data
    length; often with one field of one tensor made hostile, or the data cut or grown."""
    entries, offset = [], 0
    for index in range(draw(st.integers(1, 6))):
        code = draw(st.sampled_from(sorted(adapter.DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = math.prod(shape) * adapter.DTYPES[code].itemsize
        entry = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        entries.append((draw(st.sampled_from(["t", "h.0", "a.b"])) + f".{index}", entry))
        offset += size
    header = dict(draw(st.permutations(entries)))
    entry = header[draw(st.sampled_from(sorted(header)))]
    fault = draw(st.sampled_from(["none", "value", "dim", "offset", "dims", "missing", "data"]))
    if fault == "value":
        entry[draw(st.sampled_from(sorted(entry)))] = draw(st.one_of(HOSTILE, st.text(max_size=4)))
    elif fault == "dim" and entry["shape"]:
        entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = draw(HOSTILE)
    elif fault == "offset":
        entry["data_offsets"][draw(st.integers(0, 1))] = draw(HOSTILE)
    elif fault == "dims":
        entry["shape"] = [draw(st.sampled_from([0, 1]))] * draw(st.sampled_from([64, 65]))
    elif fault == "missing":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif fault == "data":
        offset = max(0, offset + draw(st.sampled_from([-1, 1, 4])))
    return header, offset


@settings(max_examples=300, deadline=None, database=None)
@given(packed=packed_headers())
def test_checking_all_tensors_at_once_accepts_and_refuses_as_one_by_one(tmp_path_factory, packed):
    header, data_len = packed
    path = _file(tmp_path_factory.mktemp("header") / "t.safetensors", header, data_len)
    assert _outcome(path) == _one_by_one(path)


def test_a_valid_file_of_many_tensors_is_checked_all_at_once(tmp_path):
    """No tensor is checked one at a time, and what is read is what the library reads."""
    rng = np.random.default_rng(0)
    arrays = {
        f"blocks.{i}.{name}": rng.standard_normal(shape).astype(dtype)
        for i in range(500)
        for name, shape, dtype in [("w", (3, 2), np.float16), ("b", (2,), np.int64)]
    }
    path = tmp_path / "many.safetensors"
    safetensors.numpy.save_file(arrays, path)
    with mock.patch.object(adapter, "_one_by_one", side_effect=AssertionError("one by one")):
        tensors = adapter.read_file(path)
    with safetensors.safe_open(path, "np") as library:
        assert list(tensors) == library.offset_keys()  # in file order
        for key, array in tensors.items():
            assert array.read().tobytes() == library.get_tensor(key).tobytes()
            assert array.read().dtype == library.get_tensor(key).dtype
            assert array.shape == tuple(library.get_slice(key).get_shape())


# --- a fault among many tensors is named ---------------------------------------------------

FAULTS = {
    "shape lies about size": ({"shape": [3, 3]}, r"hold 24 bytes, but F32 \[3, 3\] needs 36"),
    "a bool dimension": ({"shape": [True, 6]}, r"expected \{dtype"),
    "a dimension past int64": ({"shape": [2**64, 6]}, r"multiply past 2\*\*63 bytes"),
    "65 dimensions": ({"shape": [1] * 63 + [2, 3]}, r"65 dimensions, at most 64"),
    "an unknown dtype": ({"dtype": "F31"}, r"unsupported dtype 'F31'"),
    "a negative offset": ({"data_offsets": [-1, 23]}, r"expected \{dtype"),
    "a float offset": ({"data_offsets": [984.0, 1008]}, r"expected \{dtype"),
    "overlapping its neighbour": ({"data_offsets": [980, 1004]}, r"overlaps tensor 'layer\.40\.w'"),
}


@pytest.mark.parametrize(("change", "says"), FAULTS.values(), ids=FAULTS.keys())
def test_a_fault_in_one_of_many_tensors_names_that_tensor(tmp_path, change, says):
    header = {
        f"layer.{i}.w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24 * i, 24 * i + 24]}
        for i in range(1000)
    }
    header["layer.41.w"].update(change)
    path = _file(tmp_path / "bad.safetensors", header, 24 * 1000)
    for read in (lambda: bridge.inspect(path), lambda: adapter.read_file(path)):
        with pytest.raises(FormatError, match=rf"^{path}: tensor 'layer\.41\.w'.*{says}"):
            read()


# --- keys given twice -------------------------------------------------------------------

ENTRY = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
TWICE = {
    "a tensor": (b'{"w":' + ENTRY + b',"w":' + ENTRY + b"}", "w"),
    "a field of a tensor": (
        b'{"w":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}',
        "dtype",
    ),
    "a metadata entry": (
        b'{"__metadata__":{"format":"pt","format":"np"},"w":' + ENTRY + b"}",
        "format",
    ),
    "__metadata__": (b'{"__metadata__":{},"w":' + ENTRY + b',"__metadata__":{}}', "__metadata__"),
}


@pytest.mark.parametrize(("header", "key"), TWICE.values(), ids=TWICE.keys())
def test_a_key_given_twice_anywhere_in_the_header_is_refused(tmp_path, header, key):
    path = _file(tmp_path / "twice.safetensors", header, 4)
    for read in (lambda: bridge.inspect(path), lambda: adapter.read_file(path)):
        with pytest.raises(FormatError, match=rf"^{path}: .*key '{key}' appears twice"):
            read()


def test_inspect_of_many_tensors_says_what_the_library_says(tmp_path):
    """Empty tensors too; those share their offset, where the library's order is its
    hash map's, so the order is compared for the others."""
    arrays = {f"h.{i}.attn.{n}": np.ones((i % 3, 2), np.float32) for i in range(300) for n in "qk"}
    path = tmp_path / "many.safetensors"
    safetensors.numpy.save_file(arrays, path)
    rows = {row.target: (row.shape, row.dtype, row.nbytes) for row in bridge.inspect(path).rows}
    with safetensors.safe_open(path, "np") as library:
        order = library.offset_keys()
        said = {key: library.get_slice(key).get_shape() for key in order}
        assert rows == {
            key: (tuple(shape), "float32", library.get_tensor(key).nbytes)
            for key, shape in said.items()
        }
    assert [key for key in rows if rows[key][2]] == [key for key in order if 0 not in said[key]]


def test_inspect_of_a_sharded_directory_says_what_its_shards_say(tmp_path):
    arrays = {f"h.{i}.w": np.full((i + 1, 2), i, np.float32) for i in range(20)}
    flat = {parse_dotted(key): Leaf(value) for key, value in arrays.items()}
    directory = tmp_path / "sharded"
    adapter.write(flat, Context(options={"path": directory, "max_shard_size": 100}))
    weight_map = json.loads((directory / adapter.INDEX_FILE).read_text())["weight_map"]
    said = {}
    for shard in set(weight_map.values()):
        with safetensors.safe_open(directory / shard, "np") as library:
            said |= {key: library.get_tensor(key) for key in library.offset_keys()}
    rows = {
        row.target: (row.shape, row.dtype, row.nbytes) for row in bridge.inspect(directory).rows
    }
    assert len(set(weight_map.values())) > 1
    assert rows == {key: (a.shape, str(a.dtype), a.nbytes) for key, a in said.items()}
