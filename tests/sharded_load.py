"""Run in a process of its own with 8 CPU devices (see test_sharded.py): loads a torch
state_dict saved as safetensors (and as .pt) into an NNX model sharded over a 2x4 mesh
and checks that each device holds the right slice, and that the file was read slice by
slice, each distinct slice once."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import torch
from flax import nnx
from safetensors.numpy import save_file

import bridge
from bridge.formats import safetensors as safetensors_format
from bridge.formats import torch as torch_format

SHARDED = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("b", "a"))


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(16, 8, kernel_init=SHARDED, rngs=rngs)
        self.embed = nnx.Embed(
            32,
            16,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(), ("a", None)),
            rngs=rngs,
        )


def main(directory: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    state = {
        "up.weight": rng.normal(size=(8, 16)).astype(np.float32),  # torch Linear: (out, in)
        "up.bias": rng.normal(size=8).astype(np.float32),
        "embed.weight": rng.normal(size=(32, 16)).astype(np.float32),
    }
    path = os.path.join(directory, "model.safetensors")
    pt_path = os.path.join(directory, "model.pt")
    save_file(state, path)

    reads: list[tuple[str, object]] = []
    original_view = safetensors_format.SafetensorsArray.view

    def counting_view(self, index=...):
        reads.append((self.key, index))
        return original_view(self, index)

    safetensors_format.SafetensorsArray.view = counting_view
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    graphdef, abstract_state = nnx.get_abstract_model(lambda: Model(nnx.Rngs(0)), mesh)
    template = nnx.merge(graphdef, abstract_state)
    model = bridge.convert(path, to="nnx", template=template)

    kernel = model.up.kernel.get_value()
    assert kernel.sharding.spec == jax.P("b", "a"), kernel.sharding
    expected = state["up.weight"].T
    for shard in kernel.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
        assert shard.data.shape == (4, 4)  # (16 / b=4, 8 / a=2)
    embedding = model.embed.embedding.get_value()
    for shard in embedding.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), state["embed.weight"][shard.index])
    np.testing.assert_array_equal(np.asarray(kernel), expected)

    # a .pt file: each distinct slice taken out of torch's map once, counted
    torch.save({key: torch.from_numpy(value) for key, value in state.items()}, pt_path)
    before = torch_format.bytes_read
    from_pt = bridge.convert(pt_path, to="nnx", template=template)
    assert torch_format.bytes_read - before == sum(value.nbytes for value in state.values())
    for shard in from_pt.up.kernel.get_value().addressable_shards:
        assert np.asarray(shard.data).tobytes() == expected[shard.index].tobytes()

    weight_reads = [index for key, index in reads if key == "up.weight"]
    assert weight_reads and all(index is not Ellipsis for index in weight_reads), weight_reads
    # the transposed kernel is read through the permuted index: (out, in) slices of 4 x 4
    sizes = {tuple(part.stop - part.start for part in index) for index in weight_reads}
    assert sizes == {(4, 4)}, weight_reads

    # exports copy each sharded array to the host once, and leave no host copy cached on
    # the model's arrays (np.asarray would keep one on each: jax's _npy_value)
    out = os.path.join(directory, "exported.safetensors")
    bridge.save(from_pt, out, format="safetensors")
    bridge.save(from_pt, os.path.join(directory, "exported.msgpack"), format="msgpack")
    for variable in (from_pt.up.kernel, from_pt.up.bias, from_pt.embed.embedding):
        assert variable.get_value()._npy_value is None, variable
    exported = bridge.convert(out, to="torch")
    assert {key: value.numpy().tobytes() for key, value in exported.items()} == {
        key: value.tobytes() for key, value in state.items()
    }

    # a big-endian array is placed slice by slice too, in native byte order, same values
    big_endian = np.arange(8, dtype=">f4")
    halves = jax.sharding.NamedSharding(mesh, jax.P("a"))
    state = bridge.convert(
        {"w": big_endian}, "nnx_state", source="nnx_state", shardings={"w": halves}
    )
    placed = state["w"].get_value()
    assert placed.dtype == np.float32 and placed.sharding == halves, placed
    np.testing.assert_array_equal(np.asarray(placed), big_endian)
    print("sharded load ok:", len(weight_reads), "slice reads of up.weight")


if __name__ == "__main__":
    main(sys.argv[1])
