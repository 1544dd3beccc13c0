"""The Flax msgpack adapter: files `flax.serialization` wrote (Linen variables, pure NNX
dicts, TrainStates, chunked arrays) read bit-exactly; bytes and files written here that
Flax reads back; corrupt input refused with the file named; atomic writes."""

from __future__ import annotations

import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import optax
import pytest
from conftest import (
    LinenNet,
    abstract_nnx_net,
    assert_same_arrays,
    leaves_of,
    make_nnx_net,
)
from flax import nnx, serialization, traverse_util
from flax.training import train_state

import bridge
from bridge.errors import FormatError, OutputExistsError
from bridge.graph import GRAPH, Context, drop_transient
from bridge.tree import Leaf

mp = importlib.import_module("bridge.formats.msgpack")
FORMAT = GRAPH.format("msgpack")
TOKENS = jnp.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def _assert_same_trees(ours, expected) -> None:
    """Same paths, and every leaf bit-exact (dtype, shape, bytes)."""
    ours, expected = _flat(ours), _flat(expected)
    assert ours.keys() == expected.keys()
    for path, value in expected.items():
        assert_same_arrays(ours[path], value)


def _linen_variables() -> dict:
    return LinenNet().init(jax.random.key(0), TOKENS)


def _pure_nnx_dict() -> dict:
    """A pure NNX dict with `nnx.List` indices as int keys (RNG keys cannot be msgpack)."""
    return nnx.to_pure_dict(nnx.state(make_nnx_net(), nnx.Not(nnx.RngState)))


def _read(obj, **options) -> tuple[dict, Context]:
    ctx = Context(options=options)
    return mp.read(obj, ctx), ctx


def test_reads_linen_variables_flax_wrote_into_linen_and_nnx(tmp_path):
    variables = _linen_variables()
    assert set(variables) == {"params", "batch_stats"}
    data = serialization.to_bytes(variables)
    file = tmp_path / "ckpt.msgpack"
    file.write_bytes(data)
    for source in (data, file, str(file)):
        _assert_same_trees(bridge.convert(source, to="linen"), variables)

    flat, _ = _read(data)
    assert flat[("bn", "mean")].kind == "batch_stats" and flat[("bn", "scale")].kind == "params"
    assert ("params", "bn", "scale") not in flat  # the collection is the kind, not a path part

    model, report = bridge.convert(file, to="nnx", template=abstract_nnx_net(), strict=False)
    assert report.ok and sorted(report.dropped) == []
    expected = {
        ("batch_stats" if var_type is nnx.BatchStat else "params", *bridge.tree.linen_path(path))
        for path, (var_type, _) in leaves_of(model).items()
        if not issubclass(var_type, nnx.RngState)
    }
    assert expected == set(_flat(variables))
    for path, (var_type, value) in leaves_of(model).items():
        if not issubclass(var_type, nnx.RngState):
            collection = "batch_stats" if var_type is nnx.BatchStat else "params"
            assert_same_arrays(value, _flat(variables)[(collection, *bridge.tree.linen_path(path))])
    np.testing.assert_array_equal(model(TOKENS), LinenNet().apply(variables, TOKENS))


@pytest.mark.parametrize("writer", ["to_bytes", "msgpack_serialize"])
def test_reads_a_pure_nnx_dict_with_list_indices(writer):
    pure = _pure_nnx_dict()
    assert 0 in pure["layers"]  # nnx.List indices are int keys
    data = getattr(serialization, writer)(pure)
    raw = msgpack.unpackb(data, strict_map_key=False, ext_hook=lambda code, payload: None)
    assert list(raw["layers"]) == (["0", "1"] if writer == "to_bytes" else [0, 1])

    flat, _ = _read(data)
    assert ("layers", 0, "kernel") in flat and all(leaf.kind is None for leaf in flat.values())
    model = bridge.convert(data, to="nnx", template=abstract_nnx_net())
    for path, (var_type, value) in leaves_of(model).items():
        if not issubclass(var_type, nnx.RngState):
            assert_same_arrays(value, _flat(pure)[path])

    state = bridge.convert(data, to="nnx_state")
    assert isinstance(state, nnx.State)
    _assert_same_trees(nnx.to_pure_dict(state), pure)


def test_bf16_scalars_and_empty_subtrees_as_flax_wrote_them():
    bits = np.array([0x7FC1, 0xFF80, 0x0001, 0x8000, 0x3F80], np.uint16)  # NaN payload, -inf ...
    tree = {
        "bf16": bits.view(ml_dtypes.bfloat16),
        "jax_bf16": jnp.linspace(-1, 1, 4, dtype=jnp.bfloat16),
        "np_scalar": np.float32(1.5),
        "zero_d": np.array(3, np.int8),
        "step": 7,
        "rate": 0.25,
        "flag": True,
        "z": 1 + 2j,
        "name": "adam",
        "none": None,
        "nested": {"empty": {}, "x": np.zeros((0, 3), np.float16)},
    }
    data = serialization.to_bytes(tree)
    flat, ctx = _read(data)
    assert list(flat) == [
        ("bf16",),
        ("jax_bf16",),
        ("np_scalar",),
        ("zero_d",),
        ("step",),
        ("rate",),
        ("flag",),
        ("z",),
        ("name",),
        ("nested", "x"),
    ]
    assert_same_arrays(flat[("bf16",)].value, bits.view(ml_dtypes.bfloat16))
    assert_same_arrays(flat[("jax_bf16",)].value, np.asarray(tree["jax_bf16"]))
    assert_same_arrays(flat[("nested", "x")].value, tree["nested"]["x"])
    assert type(flat[("np_scalar",)].value) is np.float32 and flat[("np_scalar",)].value == 1.5
    assert_same_arrays(flat[("zero_d",)].value, np.array(3, np.int8))
    natives = [flat[(key,)].value for key in ("step", "rate", "flag", "z", "name")]
    assert natives == [7, 0.25, True, 1 + 2j, "adam"]
    assert [type(value) for value in natives] == [int, float, bool, complex, str]
    assert ctx.report.notes == [
        f"msgpack bytes ({len(data)} bytes): 2 empty subtrees hold no array and are not "
        "carried: none, nested/empty"
    ]

    ours = mp.write(flat, Context())
    restored = serialization.msgpack_restore(ours)
    del tree["none"], tree["nested"]["empty"]
    assert restored.keys() == tree.keys() and type(restored["np_scalar"]) is np.float32
    assert [restored[key] for key in ("step", "rate", "flag", "z", "name")] == natives
    for key in ("bf16", "jax_bf16", "zero_d"):
        assert_same_arrays(restored[key], tree[key])
    assert ours == serialization.to_bytes(tree)  # byte for byte what Flax writes

    state = bridge.convert(serialization.to_bytes({"bf16": tree["bf16"]}), to="nnx_state")
    assert_same_arrays(state["bf16"].get_value(), bits.view(ml_dtypes.bfloat16))


def test_an_empty_state_and_an_empty_collection():
    flat, ctx = _read(serialization.to_bytes({}))
    assert flat == {} and ctx.report.notes == []
    assert bridge.convert(serialization.to_bytes({}), to="linen") == {}
    data = serialization.to_bytes({"params": {"w": np.ones(2, np.float32)}, "batch_stats": {}})
    flat, ctx = _read(data)
    assert list(flat) == [("w",)] and flat[("w",)].kind == "params"
    assert "batch_stats" in ctx.report.notes[0]
    assert mp.write({}, Context()) == serialization.to_bytes({})


def test_reads_a_linen_train_state_with_adam(tmp_path):
    variables = _linen_variables()
    state = train_state.TrainState.create(
        apply_fn=LinenNet().apply, params=variables["params"], tx=optax.adam(1e-3)
    )
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads=grads)  # non-trivial moments and count
    file = tmp_path / "train.msgpack"
    file.write_bytes(serialization.to_bytes(state))

    flat, ctx = _read(file)  # what convert reads: the model state, training set aside
    assert {leaf.kind for leaf in flat.values()} == {"params"}
    assert {path[0] for path in flat} == {"embed", "conv", "bn", "norm", "layers_0", "layers_1"}
    assert any("TrainState" in note and "bridge.migrate" in note for note in ctx.report.notes)

    flat, ctx = _read(file, training=True)  # what bridge.migrate reads: everything
    training = {path: leaf for path, leaf in flat.items() if leaf.kind is None}
    assert {path[:2] for path in training} == {("step",), ("opt_state", "0")}
    assert ctx.report.notes == [
        f"{file}: 1 empty subtrees hold no array and are not carried: opt_state/1"
    ]
    adam = state.opt_state[0]
    assert_same_arrays(flat[("step",)].value, np.asarray(state.step))
    assert_same_arrays(flat[("opt_state", "0", "count")].value, np.asarray(adam.count))
    for moment in ("mu", "nu"):
        for path, value in _flat(getattr(adam, moment)).items():
            assert_same_arrays(flat[("opt_state", "0", moment, *path)].value, value)

    converted = nnx.to_pure_dict(bridge.convert(file, to="nnx_state"))
    _assert_same_trees(converted, state.params)


@pytest.mark.parametrize("to_file", [False, True])
def test_linen_round_trip_is_bit_exact_and_flax_reads_our_bytes(tmp_path, to_file):
    variables = _linen_variables()
    if to_file:
        out = bridge.save(variables, tmp_path / "v.msgpack", format="msgpack")
        assert out == tmp_path / "v.msgpack" and bridge.detect(out) == "msgpack"
        data = out.read_bytes()
        back = bridge.load(out, to="linen")
    else:
        data = bridge.convert(variables, to="msgpack")
        back = bridge.convert(data, to="linen")
    assert isinstance(data, bytes) and data == serialization.to_bytes(variables)
    _assert_same_trees(back, variables)
    _assert_same_trees(serialization.msgpack_restore(data), variables)
    template = jax.tree.map(jnp.zeros_like, variables)
    _assert_same_trees(serialization.from_bytes(template, data), variables)


def test_nnx_model_round_trip_and_flax_reads_it_as_the_linen_twin():
    model = make_nnx_net(seed=1)
    data, report = bridge.convert(model, to="msgpack", strict=False)
    assert sorted(report.dropped) == ["drop.rngs.count", "drop.rngs.key"]
    assert report.notes == [
        "1 leaves written without their Variable metadata (partitioning, ...): "
        "Flax msgpack holds arrays only"
    ]
    back = bridge.convert(data, to="nnx", template=abstract_nnx_net())
    original, restored = leaves_of(model), leaves_of(back)
    assert original.keys() == restored.keys()
    for path, (var_type, value) in original.items():
        assert restored[path][0] is var_type
        if not issubclass(var_type, nnx.RngState):
            assert_same_arrays(restored[path][1], value)
    np.testing.assert_array_equal(back(TOKENS), model(TOKENS))

    twin = serialization.from_bytes(_linen_variables(), data)  # collection-first, Linen names
    _assert_same_trees(twin, bridge.convert(model, to="linen"))
    np.testing.assert_array_equal(LinenNet().apply(twin, TOKENS), model(TOKENS))


def test_a_pure_nnx_dict_is_written_as_to_bytes_writes_it():
    pure = _pure_nnx_dict()
    data = bridge.convert(pure, to="msgpack")
    assert data == serialization.to_bytes(pure)
    _assert_same_trees(serialization.from_bytes(pure, data), pure)  # int keys kept
    assert 1 in serialization.from_bytes(pure, data)["layers"]
    _assert_same_trees(nnx.to_pure_dict(bridge.convert(data, to="nnx_state")), pure)


def test_lists_become_positions_and_are_written_as_flax_writes_lists():
    tree = {"a": [np.ones(2, np.float32), {"b": np.zeros(1, np.int32)}], "c": []}
    flat, ctx = _read(serialization.msgpack_serialize(tree))
    assert list(flat) == [("a", 0), ("a", 1, "b")] and "c" in ctx.report.notes[0]
    ours = mp.write(flat, Context())
    del tree["c"]
    restored = serialization.from_bytes(tree, ours)
    assert isinstance(restored["a"], list)
    assert_same_arrays(restored["a"][0], tree["a"][0])
    assert_same_arrays(restored["a"][1]["b"], tree["a"][1]["b"])


def test_chunked_arrays_round_trip(monkeypatch):
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)  # 16 float32 per chunk
    big = np.arange(100, dtype=np.float32).reshape(10, 10)
    theirs = serialization.to_bytes({"params": {"big": big, "small": np.ones(2, np.float32)}})
    assert theirs.count(b"__msgpack_chunked_array__") == 1

    flat, _ = _read(theirs)
    assert_same_arrays(flat[("big",)].value, big)
    assert flat[("big",)].value.flags.writeable
    ours = mp.write(flat, Context())
    assert ours == theirs
    raw = msgpack.unpackb(ours, strict_map_key=False)  # without Flax's unchunking
    assert raw["params"]["big"]["__msgpack_chunked_array__"] is True
    assert len(raw["params"]["big"]["chunks"]) == 7  # ceil(100 / 16)
    assert_same_arrays(_read(ours)[0][("big",)].value, big)


def test_read_arrays_are_writable_and_the_input_is_untouched(tmp_path):
    data = serialization.to_bytes({"params": {"w": np.arange(6.0).reshape(2, 3)}})
    copy = bytes(data)
    buffer = bytearray(data)
    file = tmp_path / "w.msgpack"
    file.write_bytes(data)
    before = (os.stat(file).st_mtime_ns, os.stat(file).st_mode)
    for source in (data, buffer, file):
        w = _read(source)[0][("w",)].value
        assert not serialization.msgpack_restore(data)["params"]["w"].flags.writeable
        assert w.flags.writeable and w.base is None
        w[...] = -1
        assert _read(source)[0][("w",)].value.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert data == copy and bytes(buffer) == copy and file.read_bytes() == copy
    assert (os.stat(file).st_mtime_ns, os.stat(file).st_mode) == before


def test_boxed_linen_variables_are_pointed_out_and_read_with_a_rule():
    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(3, kernel_init=init)(x)

    variables = Boxed().init(jax.random.key(0), jnp.ones((1, 2)))
    data = serialization.to_bytes(variables)  # Flax stores the box as {"value": array}
    flat, ctx = _read(data)
    assert ("Dense_0", "kernel", "value") in flat
    note = ctx.report.notes[0]
    assert "'params/Dense_0/kernel/value' and 0 more look like boxed variables" in note
    unboxed = nn.meta.unbox(variables)
    _assert_same_trees(bridge.convert(data, to="linen", rules=[(r"\.value$", "")]), unboxed)

    written, report = bridge.convert(variables, to="msgpack", strict=False)
    assert "1 leaves written without their Variable metadata" in report.notes[0]
    _assert_same_trees(serialization.msgpack_restore(written), unboxed)  # arrays, no boxes


def test_a_non_msgpack_file_name_needs_source(tmp_path):
    file = tmp_path / "checkpoint_100"
    file.write_bytes(serialization.to_bytes(_linen_variables()))
    with pytest.raises(FormatError, match="cannot tell the format"):
        bridge.detect(file)
    _assert_same_trees(bridge.convert(file, to="linen", source="msgpack"), _linen_variables())


def _ext_array(shape: tuple, dtype: str, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((shape, dtype, data), use_bin_type=True))


VALID = serialization.to_bytes({"params": {"w": np.arange(4, dtype=np.float32)}})
CORRUPT = {
    "truncated": (VALID[:-5], r"cannot decode \d+ bytes as Flax msgpack.*truncated or corrupt"),
    "one byte": (VALID[:1], "cannot decode 1 bytes"),
    "trailing": (VALID + b"\x00\x01", rf"the msgpack map ends at offset {len(VALID)}, but 2 more"),
    "garbage": (b"\xc1 not msgpack at all", "cannot decode"),
    "bad dtype": (
        msgpack.packb({"w": _ext_array((2,), "nosuchdtype", bytes(8))}),
        r"cannot decode 31 bytes as Flax msgpack \(TypeError: data type 'nosuchdtype'",
    ),
    "bad shape": (
        msgpack.packb({"w": _ext_array((3,), "float32", bytes(8))}),
        r"cannot decode 27 bytes as Flax msgpack \(ValueError: cannot reshape",
    ),
    "list": (msgpack.packb([1, 2]), "the top level is of type list; Flax msgpack checkpoints"),
    "array": (serialization.to_bytes(np.ones(3)), "the top level is of type ndarray"),
    "int": (msgpack.packb(5), "the top level is of type int"),
    "ext type": (msgpack.packb({"a": {"b": msgpack.ExtType(42, b"?")}}), "'a/b' holds extension"),
    "float key": (msgpack.packb({"a": {1.5: 2}}), "key 1.5 under a is a float"),
    "both keys": (msgpack.packb({"a": {0: 1, "0": 2}}), "keys 0 and '0' under a are both"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_input_is_refused_naming_the_file(tmp_path, case):
    data, message = CORRUPT[case]
    with pytest.raises(FormatError, match=rf"^msgpack bytes \({len(data)} bytes\): {message}"):
        bridge.convert(data, to="linen", source="msgpack")
    file = tmp_path / "bad.msgpack"
    file.write_bytes(data)
    with pytest.raises(FormatError, match=rf"^{file}: {message}"):
        bridge.load(file, to="linen", source="msgpack")
    assert file.read_bytes() == data


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(FormatError, match=r"nope\.msgpack: no such file"):
        mp.read(tmp_path / "nope.msgpack", Context())
    with pytest.raises(FormatError, match="no such file"):
        mp.read(tmp_path, Context())


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    target = tmp_path / "out.msgpack"
    first = {"params": {"w": np.zeros(2, np.float32)}}
    bridge.save(first, target, format="msgpack")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        bridge.save({"params": {"w": np.ones(2, np.float32)}}, target, format="msgpack")
    assert target.read_bytes() == serialization.to_bytes(first)
    second = {"params": {"w": np.ones(2, np.float32)}}
    bridge.save(second, target, format="msgpack", overwrite=True)
    assert target.read_bytes() == serialization.to_bytes(second)
    with pytest.raises(OSError, match="disk went away"):  # fails while the file is written
        mp.write(
            {("w",): Leaf(_FailingArray(), kind="params")},
            Context(options={"path": target, "overwrite": True}),
        )
    assert target.read_bytes() == serialization.to_bytes(second)
    assert [p.name for p in tmp_path.iterdir()] == ["out.msgpack"]
    target.unlink()
    with pytest.raises(OSError, match="disk went away"):
        _write({("w",): Leaf(_FailingArray())}, target)
    assert list(tmp_path.iterdir()) == []


class _FailingArray(bridge.tree.LazyArray):
    shape, dtype = (100,), np.dtype(np.float32)

    def read(self, index=...):
        raise OSError("disk went away")


def _write(flat: dict, path) -> object:
    return mp.write(flat, Context(options={"path": path}))


def test_unwritable_leaves_fail_before_any_file_exists(tmp_path):
    out = tmp_path / "o.msgpack"
    good = Leaf(np.ones(3, np.float32), kind="params")
    cases = {
        r"'params/b' is abstract": Leaf(jax.ShapeDtypeStruct((2,), jnp.float32), kind="params"),
        r"'params/b': flax.serialization cannot restore dtype <U1": Leaf(np.array(["a"])),
        r"'params/b': cannot make an array of PRNGKeyArray": Leaf(jax.random.key(0)),
    }
    for message, bad in cases.items():
        with pytest.raises(FormatError, match=message):
            _write({("a",): good, ("b",): bad.replace(kind="params")}, out)
    with pytest.raises(FormatError, match="abstract"):
        bridge.save(abstract_nnx_net(), out, format="msgpack")
    clash = {("h", 0): Leaf(np.ones(1)), ("h", "0"): Leaf(np.ones(1))}
    with pytest.raises(FormatError, match=r"two leaves are spelled 'h/0'"):
        _write(clash, out)
    for nested in ([("a",), ("a", "b")], [("a", "b"), ("a",)]):
        with pytest.raises(FormatError, match=r"^msgpack: 'a' is both a leaf and the parent of"):
            _write({path: Leaf(np.ones(1)) for path in nested}, out)
    with pytest.raises(FormatError, match="empty path"):
        _write({(): Leaf(np.ones(1))}, out)
    assert list(tmp_path.iterdir()) == []


def test_values_are_materialised_in_native_byte_order():
    big_endian = np.arange(3, dtype=">i4")
    lazy = bridge.tree.Derived((np.arange(4.0),), lambda a: a * 2, (4,), np.dtype(np.float64))
    flat = {
        ("big",): Leaf(big_endian),
        ("lazy",): Leaf(lazy),
        ("jax",): Leaf(jnp.arange(3, dtype=jnp.bfloat16)),
        ("transposed",): Leaf(np.arange(6, dtype=np.float32).reshape(2, 3).T),
    }
    restored = serialization.msgpack_restore(mp.write(flat, Context()))
    assert_same_arrays(restored["big"], np.arange(3, dtype="<i4"))
    assert_same_arrays(restored["lazy"], np.arange(4.0) * 2)
    assert_same_arrays(restored["jax"], np.arange(3, dtype=ml_dtypes.bfloat16))
    assert_same_arrays(restored["transposed"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    assert big_endian.dtype == np.dtype(">i4")  # the input is not converted in place


def test_detect(tmp_path):
    file = tmp_path / "m.msgpack"
    file.write_bytes(VALID)
    other = tmp_path / "m.bin"
    other.write_bytes(VALID)
    assert mp.detect(file) == mp.detect(str(file)) == 1.0 and bridge.detect(file) == "msgpack"
    assert mp.detect(VALID) == mp.detect(bytearray(VALID)) == 0.9
    assert bridge.detect(VALID) == "msgpack"
    assert mp.detect(serialization.msgpack_serialize({f"k{i}": i for i in range(20)})) == 0.9
    for obj in (
        other,
        tmp_path / "nope.msgpack",
        tmp_path,
        "x\0y.msgpack",
        b"",
        msgpack.packb([1]),
        {"params": {}},
        None,
        3,
    ):
        assert mp.detect(obj) == 0.0, obj


def test_registration_and_routes():
    assert FORMAT.options == {"path", "overwrite"}
    assert (FORMAT.read, FORMAT.write, FORMAT.detect) == (mp.read, mp.write, mp.detect)
    edges = {(e.src, e.dst): e for e in bridge.conversions() if "msgpack" in (e.src, e.dst)}
    assert set(edges) == {
        ("msgpack", "linen"),
        ("linen", "msgpack"),
        ("msgpack", "nnx_state"),
        ("nnx_state", "msgpack"),
    }
    assert all(edge.cost == 1.0 and not edge.needs for edge in edges.values())
    assert {key for key, edge in edges.items() if edge.lossy} == {
        ("linen", "msgpack"),
        ("nnx_state", "msgpack"),
    }
    assert edges[("nnx_state", "msgpack")].transform is drop_transient
    assert [str(e) for e in bridge.route("nnx", "msgpack")] == [
        "nnx -> nnx_state",
        "nnx_state -> msgpack (lossy: Variable metadata (partitioning), NNX RNG state)",
    ]
    assert [(e.src, e.dst) for e in bridge.route("linen", "msgpack")] == [("linen", "msgpack")]
    assert [(e.src, e.dst) for e in bridge.route("msgpack", "nnx")] == [
        ("msgpack", "nnx_state"),
        ("nnx_state", "nnx"),
    ]
    assert not any(e.lossy for e in bridge.route("msgpack", "nnx"))
    plan = bridge.plan(make_nnx_net(), to="msgpack")
    assert plan.lossy and {row.target for row in plan.rows} >= {
        "params/layers_0/kernel",
        "batch_stats/bn/mean",
    }
    with pytest.raises(bridge.NoRouteError, match="template"):
        bridge.convert(VALID, to="nnx")
