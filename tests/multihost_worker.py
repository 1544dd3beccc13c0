"""One of the processes of tests/test_multihost.py: `python multihost_worker.py PORT
PROCESSES INDEX DIRECTORY`, with 4 CPU devices (XLA_FLAGS set by the launcher).

All processes load a Llama-shaped checkpoint (test_multihost.write_sources wrote it in
DIRECTORY) into a model sharded over a (2, 4) mesh spanning the processes, check every
shard they hold against the file and count the bytes they read (safetensors and .pt);
then save it to Orbax, safetensors and msgpack together, reload each and compare bit
for bit (msgpack against flax.serialization's bytes, and the gathered bytes process 0
held at once); then fail on purpose, on one process or the other, in bridge or inside
Orbax's own save, and check every process raises, promptly. What the launcher
checks across processes goes to DIRECTORY/result{INDEX}.json, not to stdout, where gloo's
own log lines can land in the middle of ours.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file

LAYERS, VOCAB, HIDDEN, INTERMEDIATE, KV = 4, 512, 128, 256, 64
MESH_SHAPE, AXES = (2, 4), ("data", "model")
STARTUP_TIMEOUT = 40
"""Seconds the processes have to find each other; on a busy machine they sometimes do
not (the launcher then tries once more, on another port)."""
STARTED = "all processes connected"


def llama_state() -> dict[str, np.ndarray]:
    """A Llama state_dict (torch layout: Linear weights (out, in)) of random float32."""
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        block = f"model.layers.{i}"
        shapes |= {
            f"{block}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            f"{block}.self_attn.k_proj.weight": (KV, HIDDEN),
            f"{block}.self_attn.v_proj.weight": (KV, HIDDEN),
            f"{block}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            f"{block}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{block}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{block}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            f"{block}.input_layernorm.weight": (HIDDEN,),
            f"{block}.post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return {key: rng.normal(size=shape).astype(np.float32) for key, shape in shapes.items()}


def _linear(rngs: nnx.Rngs, n_in: int, n_out: int, names: tuple) -> nnx.Linear:
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
    return nnx.Linear(n_in, n_out, use_bias=False, kernel_init=init, rngs=rngs)


def _norm(rngs: nnx.Rngs) -> nnx.RMSNorm:  # replicated on every device
    return nnx.RMSNorm(
        HIDDEN, scale_init=nnx.with_partitioning(nnx.initializers.ones, (None,)), rngs=rngs
    )


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.q_proj = _linear(rngs, HIDDEN, HIDDEN, ("data", "model"))
        self.k_proj = _linear(rngs, HIDDEN, KV, ("data", "model"))
        self.v_proj = _linear(rngs, HIDDEN, KV, ("data", "model"))
        self.o_proj = _linear(rngs, HIDDEN, HIDDEN, ("model", "data"))


class Mlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.gate_proj = _linear(rngs, HIDDEN, INTERMEDIATE, ("data", "model"))
        self.up_proj = _linear(rngs, HIDDEN, INTERMEDIATE, ("data", "model"))
        self.down_proj = _linear(rngs, INTERMEDIATE, HIDDEN, ("model", "data"))


class Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.self_attn = Attention(rngs)
        self.mlp = Mlp(rngs)
        self.input_layernorm = _norm(rngs)
        self.post_attention_layernorm = _norm(rngs)


class Decoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        init = nnx.with_partitioning(nnx.initializers.normal(), ("data", "model"))
        self.embed_tokens = nnx.Embed(VOCAB, HIDDEN, embedding_init=init, rngs=rngs)
        self.layers = nnx.List([Layer(rngs) for _ in range(LAYERS)])
        self.norm = _norm(rngs)


class Llama(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.model = Decoder(rngs)
        # split across processes only: the 4 devices of a process hold the same slice
        self.lm_head = _linear(rngs, HIDDEN, VOCAB, (None, "data"))


def expected_values(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The NNX leaves by dotted path: Linear weights transposed to (in, out) kernels."""
    expected = {}
    for key, value in state.items():
        module = key.rpartition(".")[0]
        if module.endswith("embed_tokens"):
            expected[f"{module}.embedding"] = value
        elif module.endswith(("norm", "layernorm")):
            expected[f"{module}.scale"] = value
        else:
            expected[f"{module}.kernel"] = value.T
    return expected


def leaves(model: nnx.Module) -> dict[str, jax.Array]:
    return {
        ".".join(map(str, path)): variable.get_value()
        for path, variable in nnx.to_flat_state(nnx.state(model))
    }


def check_shards(model: nnx.Module, expected: dict[str, np.ndarray], what: str) -> None:
    """Every shard this process holds equals the file's slice, bit for bit; every array is
    a global one over the mesh (not a local copy)."""
    values = leaves(model)
    assert sorted(values) == sorted(expected), (what, sorted(set(values) ^ set(expected)))
    for key, array in values.items():
        assert array.sharding.mesh.shape_tuple == tuple(zip(AXES, MESH_SHAPE, strict=True)), key
        assert not array.is_fully_addressable, (what, key, array.sharding)
        for shard in array.addressable_shards:
            data = np.asarray(shard.data)
            want = expected[key][shard.index]
            assert data.dtype == want.dtype and data.tobytes() == want.tobytes(), (what, key)


def own_bytes(template: nnx.Module) -> int:
    """What this process must read: each distinct slice its devices hold, once."""
    total = 0
    for array in leaves(template).values():
        indices = array.sharding.addressable_devices_indices_map(array.shape).values()
        distinct = {tuple((s.start, s.stop) for s in index) for index in indices}
        for index in distinct:
            shape = [
                (stop or dim) - (start or 0)
                for (start, stop), dim in zip(index, array.shape, strict=True)
            ]
            total += int(np.prod(shape)) * array.dtype.itemsize
    return total


def linen_names(parts: list[str]) -> tuple[str, ...]:
    """`["layers", "0", "mlp"]` -> `("layers_0", "mlp")`: Linen names list items so."""
    named: list[str] = []
    for part in parts:
        if part.isdigit():
            named[-1] = f"{named[-1]}_{part}"
        else:
            named.append(part)
    return tuple(named)


def flax_msgpack(model: nnx.Module) -> bytes:
    """What `flax.serialization.msgpack_serialize` makes of the model's Linen variables,
    each array gathered whole by jax itself (every process takes part)."""
    from flax import serialization, traverse_util
    from jax.experimental import multihost_utils

    flat = {
        ("params", *linen_names(key.split("."))): np.asarray(
            multihost_utils.process_allgather(array, tiled=True)
        )
        for key, array in leaves(model).items()
    }
    return serialization.msgpack_serialize(traverse_util.unflatten_dict(flat))


def expect_failure(failing: int, error: type, *args, **kwargs) -> str:
    """`bridge.save(*args, **kwargs)` raises on every process: `error` on process
    `failing`, `PeerError` on the others. Returns the message this process got."""
    import bridge

    try:
        bridge.save(*args, **kwargs)
    except bridge.BridgeError as exc:
        wanted = error if jax.process_index() == failing else bridge.PeerError
        assert isinstance(exc, wanted), (type(exc), exc)
        return str(exc)
    raise AssertionError("no error")


def orbax_fails_on(failing: int, model: nnx.Module, path: Path) -> dict:
    """Orbax's own array writer fails on process `failing` alone: every process raises
    within seconds (Orbax's barriers would wait 20 minutes), nothing is left at `path`."""
    import orbax.checkpoint as ocp

    import bridge

    handler = ocp.type_handlers.ArrayHandler
    original = handler.serialize

    async def failing_serialize(self, *args, **kwargs):
        raise OSError("injected: no space left on device")

    if jax.process_index() == failing:
        handler.serialize = failing_serialize
    start = time.monotonic()
    try:
        message = expect_failure(failing, bridge.FormatError, model, path, format="orbax")
    finally:
        handler.serialize = original
    assert "injected: no space left on device" in message, message
    return {"seconds": time.monotonic() - start, "message": message, "left": path.exists()}


def main(port: str, processes: str, index: str, directory: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"localhost:{port}",
        num_processes=int(processes),
        process_id=int(index),
        initialization_timeout=STARTUP_TIMEOUT,
    )
    print(STARTED, flush=True)
    import bridge
    from bridge import multihost
    from bridge.formats import safetensors as safetensors_format
    from bridge.formats import torch as torch_format

    here = Path(directory)
    me = jax.process_index()
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    mesh = jax.make_mesh(MESH_SHAPE, AXES)
    graphdef, abstract = nnx.get_abstract_model(lambda: Llama(nnx.Rngs(0)), mesh)
    template = nnx.merge(graphdef, abstract)
    expected = expected_values(load_file(here / "model.safetensors"))
    result: dict = {"process": me, "total_bytes": sum(v.nbytes for v in expected.values())}
    result["own_bytes"] = own_bytes(template)

    # loads: each process reads exactly the slices its devices hold
    for name in ("model.safetensors", "hf"):
        before = safetensors_format.bytes_read
        model = bridge.load(here / name, to="nnx", template=template)
        result[f"read {name}"] = safetensors_format.bytes_read - before
        check_shards(model, expected, name)
    before = torch_format.bytes_read
    model_pt = bridge.load(here / "model.pt", to="nnx", template=template)
    result["read model.pt"] = torch_format.bytes_read - before
    check_shards(model_pt, expected, ".pt")

    # saves from every process, then loads of what was saved, bit for bit
    out = here / "out"
    assert bridge.save(model, out / "ckpt", format="orbax") == (out / "ckpt").absolute()
    check_shards(bridge.load(out / "ckpt", to="nnx", template=template), expected, "orbax")
    assert (
        bridge.save(model, out / "model.safetensors", format="safetensors")
        == out / "model.safetensors"
    )
    result["safetensors identical"] = (out / "model.safetensors").read_bytes() == (
        here / "model.safetensors"
    ).read_bytes()
    check_shards(
        bridge.load(out / "model.safetensors", to="nnx", template=template),
        expected,
        "saved safetensors",
    )
    bridge.save(model, out / "sharded", format="safetensors", max_shard_size="1MB")
    check_shards(
        bridge.load(out / "sharded", to="nnx", template=template), expected, "saved shards"
    )
    # .pt: process 0 gathers the arrays and torch.save's the state_dict, the others wait
    assert bridge.save(model, out / "model.pt", format="torch") == (out / "model.pt").absolute()
    if me == 0:
        import torch

        saved = torch.load(out / "model.pt", weights_only=True)
        source = torch.load(here / "model.pt", weights_only=True)
        result["pt identical"] = saved.keys() == source.keys() and all(
            saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor)
            for key, tensor in source.items()
        )
    # msgpack: process 0 writes the bytes flax.serialization makes of the whole state,
    # holding one gathered array at a time, never the model
    multihost.peak_gathered_bytes = 0
    bridge.save(model, out / "model.msgpack", format="msgpack")
    result["msgpack peak gathered"] = multihost.peak_gathered_bytes
    result["largest array"] = max(value.nbytes for value in expected.values())
    reference = flax_msgpack(model)
    if me == 0:
        result["msgpack identical"] = (out / "model.msgpack").read_bytes() == reference
    # gathers where no mesh axis lies within a process, or no dimension divides by one
    line = jax.sharding.NamedSharding(jax.make_mesh((8,), ("all",)), jax.P("all"))
    everywhere = jax.sharding.NamedSharding(mesh, jax.P())
    odd = {
        "line": jax.device_put(np.arange(16, dtype=np.float32), line),
        "six": jax.device_put(np.arange(6, dtype=np.int32), everywhere),
    }
    bridge.save(odd, here / "odd.safetensors", format="safetensors", source="nnx_state")
    saved = load_file(here / "odd.safetensors")
    assert saved["line"].tobytes() == np.arange(16, dtype=np.float32).tobytes(), saved
    assert saved["six"].tobytes() == np.arange(6, dtype=np.int32).tobytes(), saved
    plan = str(bridge.plan(out / "model.msgpack", to="nnx", template=template))
    assert "each of the 2 processes parses the whole file" in plan, plan
    check_shards(
        bridge.load(out / "model.msgpack", to="nnx", template=template), expected, "msgpack"
    )

    # overwrite semantics hold across processes: refused on all, then replaced
    expect_failure(0, bridge.OutputExistsError, model, out / "ckpt", format="orbax")
    expect_failure(
        0, bridge.OutputExistsError, model, out / "model.safetensors", format="safetensors"
    )
    bridge.save(model, out / "ckpt", format="orbax", overwrite=True)
    check_shards(
        bridge.load(out / "ckpt", to="nnx", template=template), expected, "orbax overwritten"
    )

    # a failure on process 1 alone ends the save on every process, leaving nothing: its
    # source is missing, or (Orbax, where every process writes) holds no numbers
    source = here / ("model.safetensors" if me == 0 else "missing.safetensors")
    for name, fmt, like in (
        ("failed_ckpt", "orbax", template),
        ("failed.safetensors", "safetensors", None),
    ):
        result[f"message {fmt}"] = expect_failure(
            1, bridge.FormatError, source, out / name, format=fmt, template=like
        )
    strings = {"w": np.array(["not numbers"])} if me == 1 else {"w": np.zeros(3, np.float32)}
    result["message orbax layout"] = expect_failure(
        1, bridge.FormatError, strings, out / "failed_ckpt", format="orbax", source="nnx_state"
    )
    for failing in (1, 0):
        result[f"orbax failure on {failing}"] = orbax_fails_on(failing, model, out / "failed_ckpt")
    assert sorted(p.name for p in out.iterdir()) == [
        "ckpt",
        "model.msgpack",
        "model.pt",
        "model.safetensors",
        "sharded",
    ], list(out.iterdir())

    # an uneven split: JAX holds no uneven shards, so a clear error names the leaf
    quarters = jax.sharding.NamedSharding(mesh, jax.P("model"))
    try:
        bridge.convert(
            {"w": np.arange(6.0, dtype=np.float32)},
            "nnx_state",
            source="nnx_state",
            shardings={"w": quarters},
        )
        raise AssertionError("uneven split placed")
    except bridge.FormatError as exc:
        assert "'w'" in str(exc) and "(6,)" in str(exc), exc
        result["uneven"] = str(exc)

    # an in-memory state_dict of arrays spanning processes: no process can make it alone
    try:
        bridge.convert(model, to="torch")
        raise AssertionError("a state_dict of arrays spanning processes")
    except bridge.FormatError as exc:
        assert "spans processes" in str(exc), exc

    # a Linen TrainState whose arrays span the processes -> sharded NNX model + optimizer
    from flax.training import train_state

    params = bridge.convert(model, to="linen")["params"]
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
    optimizer_template = nnx.merge(
        *nnx.get_abstract_model(
            lambda: nnx.Optimizer(Llama(nnx.Rngs(0)), optax.adam(1e-3), wrt=nnx.Param), mesh
        )
    )
    migrated, optimizer = bridge.migrate(state, model=template, optimizer=optimizer_template)
    check_shards(migrated, expected, "migrated")
    mu = optimizer.opt_state[0].mu["model"]["embed_tokens"]["embedding"].get_value()
    assert not mu.is_fully_addressable and all(
        not np.asarray(s.data).any() for s in mu.addressable_shards
    )
    (here / f"result{index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # at once: jax.distributed's shutdown would wait for the other processes
