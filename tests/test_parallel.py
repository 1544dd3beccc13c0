"""`threads=`: loads read and place tensors on several threads, with the same result
(bytes and key order) as one thread, and never more than a few tensors in flight."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import bridge
from bridge.parallel import in_order


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(5, 3, rngs=rngs)
        self.norm = nnx.LayerNorm(3, rngs=rngs)


class Many(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([Block(rngs) for _ in range(12)])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(12):
        tensors[f"blocks.{i}.lin.weight"] = rng.standard_normal((3, 5), np.float32)
        tensors[f"blocks.{i}.lin.bias"] = rng.standard_normal((3,), np.float32)
        tensors[f"blocks.{i}.norm.weight"] = rng.standard_normal((3,), np.float32)
        tensors[f"blocks.{i}.norm.bias"] = rng.standard_normal((3,), np.float32)
    path = tmp_path_factory.mktemp("parallel") / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


def _flat(state) -> list[tuple[tuple, bytes]]:
    return [
        (tuple(path), np.asarray(variable.get_value()).tobytes())
        for path, variable in nnx.to_flat_state(state)
    ]


@pytest.mark.parametrize("threads", [2, 5, "auto"])
def test_nnx_loads_on_threads_equal_one_thread(checkpoint, threads):
    path, tensors = checkpoint
    template = nnx.eval_shape(lambda: Many(nnx.Rngs(0)))
    one = bridge.load(path, to="nnx", template=template, progress=False, threads=1)
    many = bridge.load(path, to="nnx", template=template, progress=False, threads=threads)
    assert _flat(nnx.state(many)) == _flat(nnx.state(one))
    kernel = np.asarray(many.blocks[7].lin.kernel.get_value())
    assert kernel.tobytes() == tensors["blocks.7.lin.weight"].T.tobytes()


def test_linen_loads_on_threads_equal_one_thread(checkpoint):
    path, _ = checkpoint
    model = bridge.load(path, to="nnx", template=nnx.eval_shape(lambda: Many(nnx.Rngs(0))))
    one = bridge.convert(model, to="linen", progress=False, threads=1)
    many = bridge.convert(model, to="linen", progress=False, threads=3)
    flat_one = nnx.traversals.flatten_mapping(one)
    flat_many = nnx.traversals.flatten_mapping(many)
    assert list(flat_many) == list(flat_one)
    assert [np.asarray(v).tobytes() for v in flat_many.values()] == [
        np.asarray(v).tobytes() for v in flat_one.values()
    ]


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_at_most_threads_plus_one_items_are_in_flight(threads):
    lock = threading.Lock()
    started, consumed, most = 0, 0, 0

    def work(item: int) -> int:
        nonlocal started, most
        with lock:
            started += 1
            most = max(most, started - consumed)
        return item * 2

    out = []
    for item, result in in_order(work, range(40), threads):
        out.append((item, result))
        with lock:
            consumed += 1
    assert out == [(i, 2 * i) for i in range(40)]
    assert most <= threads + 1


@pytest.mark.parametrize("threads", [2, 3])
def test_safetensors_exports_on_threads_write_the_bytes_of_one_thread(
    checkpoint, tmp_path, monkeypatch, threads
):
    """An export makes each tensor's bytes (host copy, transpose, byte order) on the
    pool (`in_order`: at most `threads + 1` in flight) while earlier ones are written:
    the same file, byte for byte, as one thread."""
    path, tensors = checkpoint
    model = bridge.load(path, to="nnx", template=nnx.eval_shape(lambda: Many(nnx.Rngs(0))))
    one = bridge.save(model, tmp_path / "one.safetensors", format="safetensors", threads=1)
    module = sys.modules["bridge.formats.safetensors"]
    makers = []
    original = module._little_endian
    monkeypatch.setattr(
        module,
        "_little_endian",
        lambda key, leaf: makers.append(threading.current_thread()) or original(key, leaf),
    )
    many = bridge.save(model, tmp_path / "many.safetensors", format="safetensors", threads=threads)
    assert many.read_bytes() == one.read_bytes()
    assert len(makers) == len(tensors)
    assert threading.main_thread() not in makers  # all made on the pool


def test_the_first_error_in_input_order_is_raised():
    def work(item: int) -> int:
        if item in (3, 6):
            raise KeyError(item)
        return item

    with pytest.raises(KeyError, match="3"):
        list(in_order(work, range(10), 4))


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "all"])
def test_threads_must_be_a_positive_int_or_auto(checkpoint, threads):
    path, _ = checkpoint
    template = nnx.eval_shape(lambda: Many(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="threads="):
        bridge.load(path, to="nnx", template=template, progress=False, threads=threads)


PLACED_ON_THE_CALLERS_DEVICE = """
import jax, numpy as np
from bridge.parallel import in_order
assert jax.device_count() == 2
with jax.default_device(jax.devices()[1]):
    out = [v for _, v in in_order(lambda i: jax.numpy.asarray(np.ones(i + 1)), range(6), 3)]
print(sorted({d.id for value in out for d in value.devices()}))
"""


def test_workers_place_on_the_callers_default_device():
    """`jax.default_device` is per thread: the workers take the caller's (two CPU
    devices need a fresh process)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run(
        [sys.executable, "-c", PLACED_ON_THE_CALLERS_DEVICE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1]"


def test_workers_take_the_callers_64_bit_mode():
    with jax.enable_x64(True):
        out = dict(in_order(lambda item: jax.numpy.asarray(np.int64(2**40)), range(3), 2))
    assert [int(value) for value in out.values()] == [2**40] * 3
