"""The Orbax adapter: checkpoints the real library wrote (v0, v1, CheckpointManager, NNX and
Linen trees) read bit-exactly, round trips through `bridge.save` that keep kinds, int keys
and partitioning metadata, template shardings, partial restores, metadata-only inspection,
and refusals that name the path and leave no partial output behind."""

from __future__ import annotations

import importlib
import shutil
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import torch
from conftest import LinenNet, abstract_nnx_net, assert_same_arrays, leaves_of, make_nnx_net
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import bridge
from bridge.errors import FormatError, MismatchError, OutputExistsError
from bridge.graph import GRAPH, Context
from bridge.tree import Leaf, normalize_metadata

pytestmark = pytest.mark.filterwarnings(
    # When a restore fails (the damaged checkpoints below), reads tensorstore still has in
    # flight complete after Orbax has closed its event loop, and their callbacks raise
    # "Event loop is closed" in a tensorstore thread: noise, not a result of these tests.
    "ignore::pytest.PytestUnraisableExceptionWarning"
)
orbax_format = importlib.import_module("bridge.formats.orbax")  # not yet in bridge.formats
orbax_restore = importlib.import_module("bridge.formats.orbax_restore")
FORMAT = GRAPH.format("orbax")
_FLAGS = nnx.Variable.required_metadata


def _std_save(path: Path, tree) -> Path:
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
    return path


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes, and every directory: a before/after record."""
    return {
        str(path.relative_to(root)): path.read_bytes() if path.is_file() else b"<dir>"
        for path in sorted(root.rglob("*"))
    }


def _bits(value) -> np.ndarray:
    """A value's bytes as numpy, PRNG keys through their key data."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(value))
    return np.asarray(value)


def _assert_same_models(ours: dict, expected: dict) -> None:
    assert ours.keys() == expected.keys()
    for path, (variable_type, value) in expected.items():
        assert ours[path][0] is variable_type, path
        assert ours[path][1].dtype == value.dtype, path
        assert_same_arrays(_bits(ours[path][1]), _bits(value))


def _metadata(state: nnx.State) -> dict:
    return {
        tuple(path): normalize_metadata(
            {k: v for k, v in var.get_metadata().items() if k not in _FLAGS}
        )
        for path, var in nnx.to_flat_state(state)
    }


def _random(shape, dtype=np.float32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# --- checkpoints the real library wrote -------------------------------------------------


def test_a_standard_checkpointer_tree_is_read_bit_exactly_with_its_oddities(tmp_path):
    bf16_bits = np.array([0x7FC1, 0xFF80, 0x0001, 0x3F80], np.uint16).view(ml_dtypes.bfloat16)
    tree = {
        "layers": {0: {"w": _random((3, 2))}, 1: {"w": _random((2,), seed=1)}},
        "bf16": bf16_bits,
        "jax_bf16": jnp.linspace(0, 1, 5, dtype=jnp.bfloat16),
        "f64": np.float64(0.1) * np.arange(3),
        "scalar": 2.5,
        "count": np.array(7, np.int32),
        "nothing": None,
        "empty": {},
    }
    path = _std_save(tmp_path / "ckpt", tree)
    before = _files(path)
    ctx = Context()
    flat = FORMAT.read(str(path), ctx)
    expected = {
        ("layers", "0", "w"): tree["layers"][0]["w"],  # Orbax keeps no int keys: strings
        ("layers", "1", "w"): tree["layers"][1]["w"],
        ("bf16",): bf16_bits,
        ("jax_bf16",): np.asarray(tree["jax_bf16"]),
        ("f64",): tree["f64"],
        ("scalar",): np.array(2.5),
        ("count",): tree["count"],
    }
    assert set(flat) == set(expected)
    for key, array in expected.items():
        assert isinstance(flat[key].value, np.ndarray) and flat[key].kind is None
        assert_same_arrays(flat[key].value, array)
    assert any("2 empty entries" in note and "nothing" in note for note in ctx.report.notes)
    assert _files(path) == before

    template = {("layers", 0, "w"): Leaf(jax.ShapeDtypeStruct((3, 2), np.float32))}
    guided = FORMAT.read(str(path), Context(template_flat=template))
    assert ("layers", 0, "w") in guided and ("layers", "1", "w") in guided  # where it says


def test_nnx_state_saved_as_the_flax_guide_shows_loads_into_a_template(tmp_path):
    model = make_nnx_net()
    directory = tmp_path / "ckpt"
    _std_save(directory / "state", nnx.state(model))  # the Flax NNX checkpointing guide
    for path in (directory / "state", directory):  # the item, or the directory holding it
        restored = bridge.convert(path, to="nnx", template=abstract_nnx_net())
        _assert_same_models(leaves_of(restored), leaves_of(model))

    flat = FORMAT.read(str(directory), Context())  # no template: what the tree says
    assert ("layers", "0", "kernel") in flat and ("drop", "rngs", "key") in flat
    key_data = flat[("drop", "rngs", "key")].value  # a PRNG key comes back as its key data
    assert_same_arrays(key_data, jax.random.key_data(model.drop.rngs.key.get_value()))


def test_linen_variables_saved_as_a_pytree_load_as_linen_and_as_nnx(tmp_path):
    variables = LinenNet().init(jax.random.key(0), jnp.ones((1, 5), jnp.int32))
    path = _std_save(tmp_path / "linen", variables)
    loaded = bridge.convert(path, to="linen")
    assert jax.tree.structure(loaded) == jax.tree.structure(jax.tree.map(np.asarray, variables))
    for ours, theirs in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
        assert_same_arrays(ours, theirs)
    flat = FORMAT.read(str(path), Context())
    assert flat[("bn", "mean")].kind == "batch_stats" and flat[("conv", "kernel")].kind == "params"

    model = bridge.convert(path, to="nnx", template=abstract_nnx_net())
    assert_same_arrays(
        model.layers[0].kernel.get_value(), variables["params"]["layers_0"]["kernel"]
    )
    assert_same_arrays(model.bn.var.get_value(), variables["batch_stats"]["bn"]["var"])
    assert type(model.bn.var) is nnx.BatchStat


def test_a_checkpoint_manager_root_reads_its_latest_step_or_the_one_asked(tmp_path):
    root = tmp_path / "run"
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=5)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, args=ocp.args.StandardSave({"w": np.full(4, step, np.float32)}))
    assert bridge.detect(root) == "orbax"
    assert FORMAT.read(str(root), Context())[("w",)].value.tolist() == [3.0] * 4
    picked = FORMAT.read(str(root), Context(options={"step": 1}))
    assert picked[("w",)].value.tolist() == [1.0] * 4
    with pytest.raises(FormatError, match=r"run: no finished step 7; .* steps \[1, 2, 3\]"):
        bridge.convert(root, to="nnx_state", step=7)
    with pytest.raises(FormatError, match="single checkpoint"):
        FORMAT.read(str(root / "3"), Context(options={"step": 3}))


def test_a_composite_step_reads_its_only_pytree_item(tmp_path):
    root = tmp_path / "run"
    with ocp.CheckpointManager(root) as mgr:
        mgr.save(
            5,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"w": np.arange(3.0)}),
                extra=ocp.args.JsonSave({"note": "not arrays"}),
            ),
        )
    assert FORMAT.read(str(root), Context())[("w",)].value.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("item", ["state", "pytree"])
def test_v1_checkpoints_are_read_through_their_item_directory(tmp_path, item):
    tree = {"params": {"dense": {"kernel": _random((2, 3))}}, "count": np.array(4, np.int32)}
    ocp.v1.save(tmp_path / "v1", tree, checkpointable_name=item)  # `pytree`: older v1 releases
    assert (tmp_path / "v1" / item / "_METADATA").is_file()
    assert bridge.detect(tmp_path / "v1") == "orbax"
    state = bridge.convert(tmp_path / "v1", to="nnx_state")
    kernel = state["params"]["dense"]["kernel"].get_value()
    assert_same_arrays(kernel, tree["params"]["dense"]["kernel"])
    assert_same_arrays(state["count"].get_value(), tree["count"])


def test_several_pytree_items_read_as_one_tree_keyed_by_item(tmp_path):
    params, stats = {"dense": {"kernel": _random((2, 3))}}, {"bn": {"mean": _random(3, seed=1)}}
    ocp.v1.save_checkpointables(tmp_path / "ckpt", {"params": params, "batch_stats": stats})
    ctx = Context()
    flat = FORMAT.read(str(tmp_path / "ckpt"), ctx)
    assert flat[("dense", "kernel")].kind == "params" and flat[("bn", "mean")].kind == "batch_stats"
    assert_same_arrays(flat[("bn", "mean")].value, stats["bn"]["mean"])
    assert any("read as one tree" in note for note in ctx.report.notes)


def test_a_checkpoint_without_ocdbt_is_read(tmp_path):
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
        checkpointer.save(tmp_path / "zarr", args=ocp.args.PyTreeSave({"a": {"b": np.arange(5)}}))
    assert (tmp_path / "zarr" / "a.b" / ".zarray").is_file()
    assert bridge.detect(tmp_path / "zarr") == "orbax"
    flat = FORMAT.read(str(tmp_path / "zarr"), Context())
    assert flat[("a", "b")].value.tolist() == [0, 1, 2, 3, 4]


def test_detection_needs_markers_not_just_a_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert ocp.v1.is_orbax_checkpoint(tmp_path / "empty")  # why bridge looks for markers
    assert orbax_format.detect(tmp_path / "empty") == 0.0
    assert orbax_format.detect(tmp_path / "missing") == 0.0
    assert orbax_format.detect(42) == 0.0
    (tmp_path / "file").write_text("x")
    assert orbax_format.detect(tmp_path / "file") == 0.0


# --- round trips through bridge.save ----------------------------------------------------


def test_an_nnx_model_round_trips_with_kinds_int_keys_and_partitioning(tmp_path):
    model = make_nnx_net()
    assert _metadata(nnx.state(model))[("layers", 0, "kernel")]["out_sharding"] == ("embed", "mlp")
    path = bridge.save(model, tmp_path / "ckpt", format="orbax")
    assert path == tmp_path / "ckpt" and bridge.detect(path) == "orbax"

    restored = bridge.convert(path, to="nnx", template=abstract_nnx_net())
    _assert_same_models(leaves_of(restored), leaves_of(model))
    assert _metadata(nnx.state(restored)) == _metadata(nnx.state(model))

    state = bridge.convert(path, to="nnx_state")  # no template: the description says it all
    expected = nnx.state(model)
    assert _metadata(state) == _metadata(expected)  # `mesh: None` says nothing: not kept
    ours = {tuple(p): (type(v), v.get_value()) for p, v in nnx.to_flat_state(state)}
    _assert_same_models(
        ours, {tuple(p): (type(v), v.get_value()) for p, v in nnx.to_flat_state(expected)}
    )

    with warnings.catch_warnings():  # Orbax warns that it takes the shardings from the file
        warnings.simplefilter("ignore", UserWarning)
        plain = ocp.StandardCheckpointer().restore(path)  # plain Orbax: module-first dicts
        v1_loaded = ocp.v1.load(path)
    assert_same_arrays(plain["layers"]["0"]["kernel"], model.layers[0].kernel.get_value())
    assert_same_arrays(v1_loaded["bn"]["var"], model.bn.var.get_value())

    linen, report = bridge.convert(path, to="linen", strict=False)  # RNG state: no Linen place
    assert sorted(report.dropped) == ["drop.rngs.count", "drop.rngs.key"]
    assert set(linen) == {"params", "batch_stats"}
    assert_same_arrays(linen["params"]["layers_0"]["kernel"], model.layers[0].kernel.get_value())


def test_linen_variables_round_trip_collection_first_with_their_boxes(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    variables = {
        "params": {
            "dense": {
                "kernel": nn.LogicallyPartitioned(
                    jnp.asarray(_random((2, 3))), ("embed", "mlp"), mesh, (("embed", "data"),)
                ),
                "bias": jnp.zeros(3, jnp.bfloat16),
            }
        },
        "batch_stats": {"bn": {"mean": jnp.asarray(_random(3, seed=2))}},
    }
    path, report = bridge.convert(variables, to="orbax", path=tmp_path / "ckpt", strict=False)
    assert any("mesh not stored" in note and "params/dense.kernel" in note for note in report.notes)
    plain = ocp.StandardCheckpointer().restore(path)
    assert set(plain) == {"params", "batch_stats"}  # collection-first, as Linen users save

    boxed = bridge.convert(path, to="linen", boxed=True)
    kernel = boxed["params"]["dense"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned) and kernel.mesh is None
    assert kernel.names == ("embed", "mlp") and kernel.rules == (("embed", "data"),)
    assert_same_arrays(kernel.value, variables["params"]["dense"]["kernel"].value)
    plain_linen = bridge.convert(path, to="linen")
    assert_same_arrays(plain_linen["params"]["dense"]["bias"], variables["params"]["dense"]["bias"])
    assert_same_arrays(
        plain_linen["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"]
    )
    assert set(plain_linen) == {"params", "batch_stats"}


class TorchMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)])


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])


def test_a_torch_module_goes_through_orbax_into_nnx(tmp_path):
    torch.manual_seed(0)
    module = TorchMLP()
    path = bridge.save(module, tmp_path / "ckpt", format="orbax")
    abstract = nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0)))
    model = bridge.convert(path, to="nnx", template=abstract)
    for index, layer in enumerate(module.layers):
        assert_same_arrays(model.layers[index].kernel.get_value(), layer.weight.detach().numpy().T)
        assert_same_arrays(model.layers[index].bias.get_value(), layer.bias.detach().numpy())

    flat = FORMAT.read(str(path), Context())  # no template: ints and kinds from the description
    assert set(flat) == {("layers", i, role) for i in (0, 1) for role in ("kernel", "bias")}
    state = bridge.convert(path, to="nnx_state")
    assert type(state["layers"][1]["kernel"]) is nnx.Param


# --- template shardings, numpy without -------------------------------------------------


def test_a_template_with_shardings_restores_onto_them_and_none_gives_numpy(tmp_path):
    model = make_nnx_net()
    path = bridge.save(model, tmp_path / "ckpt", format="orbax")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("embed", "mlp"))
    graphdef, abstract_state = nnx.split(abstract_nnx_net())
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    sharded = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )
    restored = bridge.convert(path, to="nnx", template=nnx.merge(graphdef, sharded))
    kernel = restored.layers[0].kernel.get_value()
    assert kernel.sharding == NamedSharding(mesh, PartitionSpec("embed", "mlp"))
    assert restored.bn.mean.get_value().sharding == NamedSharding(mesh, PartitionSpec())
    _assert_same_models(leaves_of(restored), leaves_of(model))

    flat = FORMAT.read(str(path), Context())
    arrays = {p: leaf.value for p, leaf in flat.items() if p[-1] != "key"}
    assert all(isinstance(value, np.ndarray) for value in arrays.values())
    assert jax.dtypes.issubdtype(flat[("drop", "rngs", "key")].value.dtype, jax.dtypes.prng_key)


# --- partial restore ---------------------------------------------------------------------


def test_only_restores_a_collection_or_a_regex_and_says_what_it_skipped(tmp_path):
    path = bridge.save(make_nnx_net(), tmp_path / "ckpt", format="orbax")
    state, report = bridge.convert(path, to="nnx_state", only="batch_stats", strict=False)
    assert {tuple(p) for p, _ in nnx.to_flat_state(state)} == {("bn", "mean"), ("bn", "var")}
    assert "only='batch_stats': 13 of 15 arrays not read" in report.notes
    flat = FORMAT.read(str(path), Context(options={"only": r"^layers\.0\."}))
    assert set(flat) == {("layers", 0, "kernel"), ("layers", 0, "bias")}
    with pytest.raises(FormatError, match=r"only='opt_state' selects none of its 15 arrays"):
        FORMAT.read(str(path), Context(options={"only": "opt_state"}))
    with pytest.raises(FormatError, match="neither a collection"):
        FORMAT.read(str(path), Context(options={"only": "("}))


def test_skipped_arrays_are_not_read_at_all(tmp_path):
    tree = {"params": {"w": _random((8, 8))}, "batch_stats": {"m": _random(8, seed=1)}}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
        checkpointer.save(tmp_path / "zarr", args=ocp.args.PyTreeSave(tree))
    for chunk in (tmp_path / "zarr" / "params.w").iterdir():
        if chunk.name != ".zarray":
            chunk.unlink()
    flat = FORMAT.read(str(tmp_path / "zarr"), Context(options={"only": "batch_stats"}))
    assert_same_arrays(flat[("m",)].value, tree["batch_stats"]["m"])
    with pytest.raises(FormatError, match="zarr: Orbax could not restore"):
        FORMAT.read(str(tmp_path / "zarr"), Context())


def test_a_load_restores_largest_first_in_batches_no_larger_than_what_remains(
    tmp_path, monkeypatch
):
    """Orbax holds a batch twice while restoring it: batches shrink to half of what is
    left to restore, largest arrays first, so the last batches are the small ones; the
    arrays come back exact and in the checkpoint's order."""
    sizes = [3000, 500, 12_000, 40, 7000, 7000, 9000, 100, 2500, 6000, 11_000, 800]
    tree = {f"w{i}": _random(n, seed=i) for i, n in enumerate(sizes)}
    bridge.save(tree, tmp_path / "ckpt", format="orbax", source="torch")
    calls: list[list[int]] = []
    original = orbax_restore.Item.restore

    def restore(item, wanted):
        restored = original(item, wanted)
        calls.append([value.nbytes for value in restored.values()])
        return restored

    monkeypatch.setattr(orbax_restore.Item, "restore", restore)
    monkeypatch.setattr(orbax_restore, "MIN_RESTORE_BATCH", 1)
    flat = bridge.convert(tmp_path / "ckpt", to="torch", batch_bytes=40_000)
    assert list(flat) == sorted(tree)  # the order Orbax keeps, not the restore order
    for key, value in tree.items():
        assert flat[key].numpy().tobytes() == value.tobytes(), key
    order = [nbytes for call in calls for nbytes in call]
    assert (
        sorted(order, reverse=True)
        == order
        == sorted((a.nbytes for a in tree.values()), reverse=True)
    )
    remaining = sum(order)
    for call in calls:
        assert len(call) == 1 or sum(call) <= min(40_000, remaining // 2), (call, remaining)
        remaining -= sum(call)
    assert len(calls) > 4 and len(calls[-1]) == 1  # the last: small arrays, one by one


class _OrbaxWork:
    """Counts the work Orbax does for bridge: tree metadata parsed, `ParamInfo`s built (one
    per array per whole-tree pass), and the array names each reader call was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.metadata = self.infos = 0
        self.calls: list[list[str]] = []
        read_metadata = ocp.BasePyTreeCheckpointHandler._read_metadata_file
        new_info = ocp.type_handlers.ParamInfo.__init__
        readers = (ocp.type_handlers.NumpyHandler, ocp.type_handlers.ArrayHandler)
        deserialize = {reader: reader.deserialize for reader in readers}

        async def metadata(handler, directory):
            self.metadata += 1
            return await read_metadata(handler, directory)

        def info(param, *args, **kwargs):
            self.infos += 1
            new_info(param, *args, **kwargs)

        def reader(cls):
            async def read(handler, infos, args=None):
                self.calls.append([param.name for param in infos])
                return await deserialize[cls](handler, infos, args)

            return read

        monkeypatch.setattr(ocp.BasePyTreeCheckpointHandler, "_read_metadata_file", metadata)
        monkeypatch.setattr(ocp.type_handlers.ParamInfo, "__init__", info)
        for cls in readers:
            monkeypatch.setattr(cls, "deserialize", reader(cls))

    def during(self, call: Any, *args: Any) -> tuple[int, int, list[list[str]]]:
        self.metadata = self.infos = 0
        self.calls = []
        call(*args)
        return self.metadata, self.infos, self.calls


def test_a_batch_costs_orbax_work_for_its_own_arrays_not_the_whole_checkpoint(
    tmp_path, monkeypatch
):
    """Orbax's tree restore parses the item's `_METADATA` and builds a `ParamInfo` for every
    array on each call, however few it restores: restoring in k batches cost k times the
    whole tree. For a load (as numpy, and onto a template's devices), and for a streamed
    conversion, restoring each array alone must cost Orbax the same metadata and
    `ParamInfo` work as restoring all in one call, and every array must reach Orbax's
    readers exactly once, with its batch."""
    tree = {f"w{i}": _random(50 + i, seed=i) for i in range(24)}
    path = bridge.save(tree, tmp_path / "ckpt", format="orbax", source="torch")
    model = make_nnx_net()
    nnx_path = bridge.save(model, tmp_path / "nnx", format="orbax")
    work = _OrbaxWork(monkeypatch)

    def load(batch: int):
        flat = bridge.convert(path, to="torch", batch_bytes=batch)
        assert all(flat[key].numpy().tobytes() == tree[key].tobytes() for key in tree)

    def stream(batch: int):
        out = bridge.save(
            path, tmp_path / f"{batch}.safetensors", format="safetensors", batch_bytes=batch
        )
        back = safetensors.numpy.load_file(out)
        assert all(back[key].tobytes() == tree[key].tobytes() for key in tree)

    def onto_template(batch: int):
        loaded = bridge.convert(nnx_path, to="nnx", template=abstract_nnx_net(), batch_bytes=batch)
        assert all(isinstance(value, jax.Array) for _, value in leaves_of(loaded).values())
        _assert_same_models(leaves_of(loaded), leaves_of(model))

    names = sorted(row.target for row in bridge.inspect(nnx_path).rows)  # as stored
    for convert, arrays in ((load, sorted(tree)), (stream, sorted(tree)), (onto_template, names)):
        metadata, infos, calls = work.during(convert, 10**9)
        assert len(calls) == 1 and sorted(calls[0]) == arrays, convert
        with monkeypatch.context() as patch:
            patch.setattr(orbax_restore, "MIN_RESTORE_BATCH", 1)
            one_by_one = work.during(convert, 1)
        assert sorted(name for call in one_by_one[2] for name in call) == arrays, convert
        assert [len(call) for call in one_by_one[2]] == [1] * len(arrays), convert
        assert one_by_one[:2] == (metadata, infos) and infos <= 3 * len(arrays), convert


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # Orbax's restore, jax arrays
@pytest.mark.parametrize(
    "ocdbt, zarr3", [(True, False), (False, False), (True, True), (False, True)]
)
def test_arrays_restored_batch_by_batch_are_the_bytes_orbax_restores(tmp_path, ocdbt, zarr3):
    """Every storage Orbax writes (OCDBT or one zarr directory per array, zarr v2 or v3),
    with list positions, bfloat16, integers and a Python scalar: loaded and converted an
    array per batch, each array is what Orbax's own restore of the whole tree gives."""
    tree = {
        "layers": [{"w": _random((3, 4), seed=i)} for i in range(3)],
        "bf16": jnp.linspace(-1, 1, 7, dtype=jnp.bfloat16),
        "ids": np.arange(11, dtype=np.int64),
        "temperature": 0.5,
    }
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(tmp_path / "ckpt", args=ocp.args.PyTreeSave(tree))
    with ocp.PyTreeCheckpointer() as checkpointer:
        expected = {
            ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys): np.asarray(v)
            for keys, v in jax.tree_util.tree_flatten_with_path(
                checkpointer.restore(tmp_path / "ckpt")
            )[0]
        }
    assert len(expected) == 6
    loaded = bridge.convert(tmp_path / "ckpt", to="torch", batch_bytes=1)
    out = bridge.save(
        tmp_path / "ckpt", tmp_path / "out.safetensors", format="safetensors", batch_bytes=1
    )
    streamed = safetensors.numpy.load_file(out)
    assert loaded.keys() == streamed.keys() == expected.keys()
    for key, value in expected.items():
        tensor = loaded[key]
        assert tuple(tensor.shape) == value.shape == streamed[key].shape, key
        assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == value.tobytes(), key
        assert streamed[key].tobytes() == value.tobytes(), key


# --- inspection ---------------------------------------------------------------------------


def test_inspect_lists_keys_shapes_dtypes_and_bytes_without_reading_data(tmp_path, monkeypatch):
    path = bridge.save(make_nnx_net(), tmp_path / "ckpt", format="orbax")
    before = _files(path)

    async def no_data(*args, **kwargs):
        raise RuntimeError("array data was read")

    for reader in (ocp.type_handlers.NumpyHandler, ocp.type_handlers.ArrayHandler):
        monkeypatch.setattr(reader, "deserialize", no_data)
    inspection = bridge.inspect(path)
    text = str(inspection)
    assert inspection.format == "orbax" and len(inspection.rows) == 15
    assert "layers.0.kernel  (6, 8)     float32    192" in text
    assert text.endswith("orbax: 15 arrays, 960 bytes")
    with pytest.raises(FormatError, match="array data was read"):
        bridge.convert(path, to="nnx_state")
    only = bridge.inspect(path, only="params")
    assert len(only.rows) == 11
    assert _files(path) == before


def test_inspect_works_with_every_array_chunk_gone(tmp_path):
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
        checkpointer.save(tmp_path / "zarr", args=ocp.args.PyTreeSave({"w": _random((4, 4))}))
    for chunk in (tmp_path / "zarr" / "w").iterdir():
        if chunk.name != ".zarray":
            chunk.unlink()
    rows = bridge.inspect(tmp_path / "zarr").rows
    assert [(row.target, row.shape, row.dtype, row.nbytes) for row in rows] == [
        ("w", (4, 4), "float32", 64)
    ]
    with pytest.raises(FormatError, match="could not restore"):
        bridge.convert(tmp_path / "zarr", to="nnx_state")


# --- refusals ---------------------------------------------------------------------------


def _largest_file(root: Path) -> Path:
    return max((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage _METADATA"])
def test_a_damaged_checkpoint_is_refused_naming_it_and_left_as_it_was(tmp_path, damage):
    path = _std_save(tmp_path / "ckpt", {"a": _random(300, np.float64), "b": _random((20, 20))})
    if damage == "delete":
        _largest_file(path).unlink()
    elif damage == "truncate":
        victim = _largest_file(path)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        (path / "_METADATA").write_text("{garbage")
    before = _files(path)
    with pytest.raises(FormatError, match=str(path)):
        bridge.convert(path, to="nnx_state")
    assert _files(path) == before


def test_bridge_metadata_that_is_garbage_or_does_not_fit_the_tree_is_refused(tmp_path):
    path = bridge.save({"params": {"w": np.ones(2)}}, tmp_path / "ckpt", format="orbax")
    other = _std_save(tmp_path / "other", {"params": {"v": np.ones(2)}})
    shutil.copy(path / "_CHECKPOINT_METADATA", other / "_CHECKPOINT_METADATA")
    with pytest.raises(FormatError, match=r"other: .* disagree \(e\.g\. 'params\.v'\)"):
        FORMAT.read(str(other), Context())
    (path / "_CHECKPOINT_METADATA").write_text("not json")
    with pytest.raises(FormatError, match="_CHECKPOINT_METADATA: not readable"):
        FORMAT.read(str(path), Context())


def test_unfinished_saves_are_refused(tmp_path):
    finished = _std_save(tmp_path / "ckpt", {"w": np.ones(3)})
    unfinished = tmp_path / "ckpt.orbax-checkpoint-tmp-1712345"
    shutil.copytree(finished, unfinished)
    assert bridge.detect(unfinished) == "orbax"
    with pytest.raises(
        FormatError, match=r"ckpt\.orbax-checkpoint-tmp-1712345: an unfinished save"
    ):
        bridge.convert(unfinished, to="nnx_state")

    root = tmp_path / "run"
    root.mkdir()
    shutil.copytree(finished, root / "3.orbax-checkpoint-tmp-99")
    assert bridge.detect(root) == "orbax"
    with pytest.raises(FormatError, match=r"run: .* only steps are unfinished saves"):
        bridge.convert(root, to="nnx_state")


def test_a_checkpoint_that_does_not_fit_the_template_is_a_mismatch(tmp_path):
    path = bridge.save(NnxMLP(nnx.Rngs(0)), tmp_path / "ckpt", format="orbax")
    wider = nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0)))
    wider.layers[1] = nnx.eval_shape(lambda: nnx.Linear(4, 5, rngs=nnx.Rngs(0)))
    with pytest.raises(MismatchError, match=r"layers\.1\.kernel") as caught:
        bridge.convert(path, to="nnx", template=wider)
    assert [problem.key for problem in caught.value.report.mismatched] == [
        "layers.1.bias",
        "layers.1.kernel",
    ]
    with pytest.raises(MismatchError, match=r"embed\.embedding"):
        bridge.convert(path, to="nnx", template=abstract_nnx_net())


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "ckpt"
    bridge.save({"params": {"w": np.ones(2)}}, target, format="orbax")
    before = _files(target)
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        bridge.save({"params": {"w": np.zeros(2)}}, target, format="orbax")
    assert _files(target) == before
    bridge.save({"params": {"w": np.zeros(2)}}, target, format="orbax", overwrite=True)
    assert FORMAT.read(str(target), Context())[("w",)].value.tolist() == [0.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    (tmp_path / "fresh").mkdir()  # an empty directory, as Orbax's guides create, is no output
    bridge.save({"params": {"w": np.ones(2)}}, tmp_path / "fresh", format="orbax")
    assert FORMAT.read(str(tmp_path / "fresh"), Context())[("w",)].value.tolist() == [1.0, 1.0]


def test_orbax_collides_dotted_keys_silently_so_bridge_refuses_them(tmp_path):
    collide = {"a.b": np.array([1.0]), "a": {"b": np.array([2.0])}}
    restored = ocp.StandardCheckpointer().restore(_std_save(tmp_path / "theirs", collide))
    assert restored["a.b"].tolist() == restored["a"]["b"].tolist()  # one value lost, either

    out = tmp_path / "out"
    cases = {
        (("a.b",), ("a", "b")): r"keys \('a\.b',\) and \('a', 'b'\) would both be stored as "
        r"Orbax array 'a\.b'",
        (("layers", 0), ("layers", "0")): r"\('layers', 0\) and \('layers', '0'\) would both",
        (("a/b",), ("c",)): r"'a/b': a key part holds '\.' or '/'",
        (("a",), ("a", "b")): "'a' is both a leaf and the parent of 'a.b'",
    }
    for keys, message in cases.items():
        flat = {key: Leaf(np.ones(2)) for key in keys}
        with pytest.raises(FormatError, match=message):
            FORMAT.write(flat, Context(options={"path": out}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]


def test_abstract_leaves_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(FormatError, match=r"'bn\.bias' is abstract"):
        bridge.save(abstract_nnx_net(), tmp_path / "ckpt", format="orbax")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_save_leaves_nothing_behind(tmp_path, monkeypatch):
    real_save = ocp.StandardCheckpointer.save

    def save_then_fail(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        self.wait_until_finished()
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_fail)
    with pytest.raises(FormatError, match="ckpt: Orbax could not save the checkpoint: disk full"):
        bridge.save(make_nnx_net(), tmp_path / "ckpt", format="orbax")
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint_and_bad_options_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="empty: not an Orbax checkpoint"):
        FORMAT.read(str(tmp_path / "empty"), Context())
    with pytest.raises(FormatError, match="missing: no such directory"):
        FORMAT.read(str(tmp_path / "missing"), Context())
    with pytest.raises(FormatError, match="step='3': expected an int"):
        FORMAT.read(str(tmp_path / "empty"), Context(options={"step": "3"}))
    with pytest.raises(FormatError, match="needs path="):
        FORMAT.write({("w",): Leaf(np.ones(2))}, Context())


def test_save_to_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    written = bridge.save(linear, "ckpt", format="orbax")
    assert written == tmp_path / "ckpt"
    state = bridge.convert("ckpt", to="nnx_state")
    np.testing.assert_array_equal(state["kernel"].get_value(), linear.kernel.get_value())
