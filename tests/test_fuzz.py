"""Fuzzing the parsers: hypothesis draws safetensors files with random and mutated headers,
index files, and msgpack streams (random objects, extension types, deep nesting, valid Flax
states with bytes flipped or cut). Reading them either works or raises a `BridgeError`;
nothing else escapes. The number of examples is bounded so the file runs in seconds."""

from __future__ import annotations

import contextlib
import importlib
import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import safetensors.numpy
from flax import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bridge
from bridge.graph import GRAPH

if "torch" not in GRAPH.formats:  # the edges to torch need the torch format registered
    importlib.import_module("bridge.formats.torch")
safetensors_format = importlib.import_module("bridge.formats.safetensors")

FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def only_bridge_errors(source: Any) -> None:
    """Inspect and convert `source` to torch and to NNX: each works or is a BridgeError."""
    for read in (
        lambda: bridge.inspect(source),
        lambda: bridge.convert(source, to="torch"),
        lambda: bridge.convert(source, to="nnx_state"),
    ):
        with contextlib.suppress(bridge.BridgeError):
            read()


# --- safetensors headers ----------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
JSON = st.recursive(
    st.one_of(st.none(), NUMBERS, st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
KEYS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["__metadata__", "", ".", "a", "a.b", "a..b", "l.²", "h.0", "h.01", "0"]),
)
DTYPE_CODES = st.one_of(st.sampled_from(sorted(safetensors_format.DTYPES)), st.text(max_size=6))


@st.composite
def tensor_entries(draw: st.DrawFn) -> Any:
    """Mostly well-formed `{dtype, shape, data_offsets}` records with odd values; else any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    shape = draw(
        st.lists(st.one_of(st.integers(0, 4), NUMBERS), max_size=draw(st.sampled_from([4, 70])))
    )
    begin = draw(st.one_of(st.integers(0, 64), NUMBERS))
    end = draw(st.one_of(st.integers(0, 64), NUMBERS))
    entry: dict[str, Any] = {
        "dtype": draw(DTYPE_CODES),
        "shape": shape,
        "data_offsets": [begin, end],
    }
    if draw(st.booleans()):
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
    return entry


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """The header bytes: a dict of tensor records, any JSON, a nesting bomb, or garbage."""
    kind = draw(st.sampled_from(["tensors", "tensors", "tensors", "json", "bomb", "bytes"]))
    if kind == "bomb":
        depth = draw(st.integers(100, 5000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return opener * depth + (b"1" if opener != b"[" else b"") + closer * depth
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    header = draw(st.dictionaries(KEYS, tensor_entries(), max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.one_of(JSON, st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
        )
    return json.dumps(header).encode()


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A header, its length (true or not) and data of random size."""
    header = draw(headers())
    length = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=64))


@st.composite
def mutated_safetensors(draw: st.DrawFn) -> bytes:
    """A valid file of random small tensors with some bytes flipped, cut or inserted."""
    count = draw(st.integers(1, 3))
    header, data, offset = {}, b"", 0
    for index in range(count):
        size = draw(st.integers(0, 6)) * 4
        header[f"layer.{index}.weight"] = {
            "dtype": "F32",
            "shape": [size // 4],
            "data_offsets": [offset, offset + size],
        }
        data += draw(st.binary(min_size=size, max_size=size))
        offset += size
    encoded = json.dumps(header).encode()
    raw = bytearray(struct.pack("<Q", len(encoded)) + encoded + data)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(raw) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            raw[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del raw[position:]
            if not raw:
                break
        else:
            raw[position:position] = draw(st.binary(min_size=1, max_size=4))
    return bytes(raw)


@FUZZ
@given(data=st.one_of(safetensors_files(), mutated_safetensors()))
def test_safetensors_files_end_in_a_result_or_a_bridge_error(data):
    with tempfile.TemporaryDirectory() as directory:
        file = Path(directory) / "fuzz.safetensors"
        file.write_bytes(data)
        only_bridge_errors(file)


# --- index files ------------------------------------------------------------------------

SHARD = "model-00001-of-00002.safetensors"
SHARD_BYTES = safetensors.numpy.save({"a": np.ones(2, np.float32), "b": np.zeros(3, np.float16)})


@st.composite
def indexes(draw: st.DrawFn) -> bytes:
    """An index naming real shards, missing ones, odd names, or no weight map at all."""
    kind = draw(st.sampled_from(["map", "map", "json", "bomb"]))
    if kind == "bomb":
        depth = draw(st.integers(100, 5000))
        return b"[" * depth + b"]" * depth
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    names = st.one_of(
        st.sampled_from([SHARD, "model-00002-of-00002.safetensors", "..", ".", "", "a/b"]),
        st.text(max_size=8),
        JSON,
    )
    weight_map = draw(st.dictionaries(st.sampled_from(["a", "b", "c", "a.b"]) | KEYS, names))
    index: dict[str, Any] = {"weight_map": weight_map}
    if draw(st.booleans()):
        index["metadata"] = draw(JSON)
    return json.dumps(index).encode()


@FUZZ
@given(index=indexes())
def test_index_files_end_in_a_result_or_a_bridge_error(index):
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / safetensors_format.INDEX_FILE).write_bytes(index)
        (root / SHARD).write_bytes(SHARD_BYTES)
        only_bridge_errors(root)


# --- msgpack streams --------------------------------------------------------------------

FLAX_EXT = st.builds(
    msgpack.ExtType,
    st.sampled_from([1, 2, 3]),  # Flax's ndarray, native complex and numpy scalar codes
    st.one_of(
        st.builds(
            lambda shape, dtype, data: msgpack.packb((shape, dtype, data)),
            st.lists(st.integers(-2, 2**64 - 1), max_size=4) | st.integers(-(2**63), 2**64 - 1),
            st.sampled_from(
                ["float32", "int8", "bfloat16", ">f4", "<U2", "O", "datetime64[s]", "V3", "?"]
            ),
            st.binary(max_size=16),
        ),
        st.binary(max_size=16),
    ),
)
MSGPACK = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=6),
        st.binary(max_size=6),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
        FLAX_EXT,
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(
                st.text(max_size=4), st.sampled_from(["0", "1", "01", "²"]), st.integers(-2, 3)
            ),
            children,
            max_size=4,
        ),
    ),
    max_leaves=16,
)
VALID = serialization.to_bytes(
    {"params": {"layers_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}, "step": 3}
)


@st.composite
def msgpack_streams(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["object", "object", "mutated", "deep", "bytes"]))
    if kind == "deep":
        depth = draw(st.integers(50, 3000))
        return b"\x81\xa1a" * depth + draw(st.sampled_from([b"\x01", b"\x90", b"\x80"]))
    if kind == "bytes":
        return b"\x81" + draw(st.binary(max_size=64))
    if kind == "mutated":
        raw = bytearray(VALID)
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(raw) - 1))
            raw[position] = draw(st.integers(0, 255))
        return bytes(raw[: draw(st.integers(1, len(raw)))])
    top = draw(st.dictionaries(st.text(max_size=4), MSGPACK, min_size=1, max_size=4))
    return msgpack.packb(top)


@FUZZ
@given(data=msgpack_streams())
def test_msgpack_streams_end_in_a_result_or_a_bridge_error(data):
    only_bridge_errors(data)
    with tempfile.TemporaryDirectory() as directory:
        file = Path(directory) / "fuzz.msgpack"
        file.write_bytes(data)
        only_bridge_errors(file)
