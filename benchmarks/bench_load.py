"""Load and export speed and memory of bridge against the common recipes and the floor.

    python benchmarks/bench_load.py [--size-gb 1.0] [--dtypes float32 bfloat16] [--record]

Generates a synthetic Llama-style checkpoint (HF names, safetensors, torch layout), then
measures each method in a fresh process (so nothing is cached or shared between them):

  (a) bridge:  bridge.convert(file, to="nnx", template=abstract model)
  (b) eager:   build the model with random init, then assign each tensor of load_file
  (c) abstract: nnx.eval_shape, safetensors load_file, assign each tensor
  (d) floor:   read every tensor with safetensors and apply the same layout transform
              (numpy and jax both tried; the faster counts), keeping the results
  export:      bridge.save(model, file, format="safetensors") vs save_file of the
              same arrays laid out for torch

Memory is the peak of anonymous resident memory (RssAnon, sampled every 2 ms) above the
process's baseline once jax is imported and the template is built: ru_maxrss would also
count the checkpoint's mmap'd file pages, which the kernel can reclaim. Ratios are to
(d) from the same run. `--record` writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from results import record

VOCAB, HIDDEN, INTERMEDIATE = 32000, 1024, 2816
PROJECTIONS = {
    "self_attn": {
        "q_proj": (HIDDEN, HIDDEN),
        "k_proj": (HIDDEN, HIDDEN),
        "v_proj": (HIDDEN, HIDDEN),
        "o_proj": (HIDDEN, HIDDEN),
    },
    "mlp": {
        "gate_proj": (HIDDEN, INTERMEDIATE),
        "up_proj": (HIDDEN, INTERMEDIATE),
        "down_proj": (INTERMEDIATE, HIDDEN),
    },
}


def layer_count(size_gb: float, itemsize: int) -> int:
    """Layers for a checkpoint of about `size_gb` (embedding and head included)."""
    per_layer = sum(i * o for block in PROJECTIONS.values() for i, o in block.values())
    fixed = 2 * VOCAB * HIDDEN
    return max(1, round((size_gb * 1e9 / itemsize - fixed) / per_layer))


def build_model(layers: int, dtype: str, rngs):
    """A Llama-shaped NNX model (parameters only) with HF's attribute names."""
    import jax.numpy as jnp
    from flax import nnx

    param_dtype = jnp.dtype(dtype)

    class Block(nnx.Module):
        def __init__(self, projections: dict, rngs: nnx.Rngs) -> None:
            for name, (i, o) in projections.items():
                setattr(
                    self, name, nnx.Linear(i, o, use_bias=False, param_dtype=param_dtype, rngs=rngs)
                )

    class Layer(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.self_attn = Block(PROJECTIONS["self_attn"], rngs)
            self.mlp = Block(PROJECTIONS["mlp"], rngs)
            self.input_layernorm = nnx.RMSNorm(HIDDEN, param_dtype=param_dtype, rngs=rngs)
            self.post_attention_layernorm = nnx.RMSNorm(HIDDEN, param_dtype=param_dtype, rngs=rngs)

    class Decoder(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed_tokens = nnx.Embed(VOCAB, HIDDEN, param_dtype=param_dtype, rngs=rngs)
            self.layers = nnx.List([Layer(rngs) for _ in range(layers)])
            self.norm = nnx.RMSNorm(HIDDEN, param_dtype=param_dtype, rngs=rngs)

    class Llama(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.model = Decoder(rngs)
            self.lm_head = nnx.Linear(
                HIDDEN, VOCAB, use_bias=False, param_dtype=param_dtype, rngs=rngs
            )

    return Llama(rngs)


def generate(path: Path, layers: int, dtype: str, shard_gb: float | None = None) -> int:
    """Write the checkpoint (torch layout); returns its bytes. With `shard_gb`, `path` is
    a directory of HF-style shards written one at a time, so that generating a
    checkpoint near the machine's memory never holds more than one shard."""
    import ml_dtypes
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    tensors = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "lm_head.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for index in range(layers):
        prefix = f"model.layers.{index}"
        for block, projections in PROJECTIONS.items():
            for name, (i, o) in projections.items():
                tensors[f"{prefix}.{block}.{name}.weight"] = (o, i)
        tensors[f"{prefix}.input_layernorm.weight"] = (HIDDEN,)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = (HIDDEN,)
    itemsize = np.dtype(np_dtype).itemsize
    limit = shard_gb * 1e9 if shard_gb else float("inf")
    shards: list[list[str]] = [[]]
    size = 0.0
    for key, shape in tensors.items():
        if shards[-1] and size + np.prod(shape) * itemsize > limit:
            shards.append([])
            size = 0.0
        shards[-1].append(key)
        size += np.prod(shape) * itemsize
    if shard_gb is None:
        files = [path]
    else:
        path.mkdir()
        files = [
            path / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
    weight_map = {}
    for file, keys in zip(files, shards, strict=True):
        arrays = {
            key: rng.standard_normal(tensors[key], np.float32).astype(np_dtype) for key in keys
        }
        save_file(arrays, file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, file.name)
        del arrays
    total = sum(file.stat().st_size for file in files)
    if shard_gb is not None:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


# --- measuring one method in this process ------------------------------------------------


class AnonPeak:
    """Samples RssAnon (anonymous resident memory, from /proc) in a thread."""

    def __init__(self) -> None:
        self.base = self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_anon())

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def kernel_paths(model) -> set[str]:
    from flax import nnx

    return {
        ".".join(map(str, path))
        for path, _ in nnx.to_flat_state(nnx.state(model))
        if path[-1] == "kernel"
    }


def torch_key(path: str) -> str:
    return path.rsplit(".", 1)[0] + ".weight"


def assign(model, path: str, value) -> None:
    """Set the Variable at dotted `path` (the per-key loop users write by hand)."""
    node = model
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    getattr(node, leaf).set_value(value)


def flax_name(key: str, kernels: set[str]) -> tuple[str, bool]:
    """torch key -> (NNX dotted path, transpose?) for this model's HF names."""
    stem = key.rsplit(".", 1)[0]
    if f"{stem}.kernel" in kernels:
        return f"{stem}.kernel", True
    if stem.endswith("embed_tokens"):
        return f"{stem}.embedding", False
    return f"{stem}.scale", False


def method_bridge(path: Path, template, layers: int, dtype: str):
    import bridge

    return bridge.convert(path, to="nnx", template=template, progress=False)


def method_bridge_threads(path: Path, template, layers: int, dtype: str):
    """(a) on one thread per core (`threads="auto"`)."""
    import bridge

    return bridge.convert(path, to="nnx", template=template, progress=False, threads="auto")


def method_cat(path: Path, template, layers: int, dtype: str):
    """`cat` of the checkpoint's files to /dev/null: reading the bytes from the page
    cache once, the floor of any load."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True, timeout=600)
    return []


def assign_all(path: Path, model):
    """The per-key loop users write: load_file, then transpose and set each tensor."""
    import jax.numpy as jnp
    from safetensors.flax import load_file

    kernels = kernel_paths(model)
    for key, value in load_file(path).items():
        name, transpose = flax_name(key, kernels)
        assign(model, name, jnp.asarray(value.T if transpose else value))
    return model


def method_eager(path: Path, template, layers: int, dtype: str):
    from flax import nnx

    return assign_all(path, build_model(layers, dtype, nnx.Rngs(0)))


def method_abstract(path: Path, template, layers: int, dtype: str):
    return assign_all(path, template)


def method_floor_numpy(path: Path, template, layers: int, dtype: str):
    """Read each tensor with safetensors' numpy reader, transpose with numpy, put it on
    the device. (safetensors' numpy reader has no bfloat16: float32 only.)"""
    import jax.numpy as jnp
    from safetensors import safe_open

    kernels = kernel_paths(template)
    out = []
    with safe_open(path, framework="numpy") as file:
        for key in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
            _, transpose = flax_name(key, kernels)
            array = file.get_tensor(key)
            out.append(jnp.asarray(array.T if transpose else array))
    return out


def method_floor_jax(path: Path, template, layers: int, dtype: str):
    """Read each tensor with safetensors' jax reader, transpose with jax."""
    from safetensors import safe_open

    kernels = kernel_paths(template)
    out = []
    with safe_open(path, framework="flax") as file:
        for key in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
            _, transpose = flax_name(key, kernels)
            array = file.get_tensor(key)
            out.append(array.T.copy() if transpose else array)
    for array in out:
        array.block_until_ready()
    return out


def method_export_bridge(path: Path, template, layers: int, dtype: str, threads: Any = 1):
    import bridge

    model = bridge.convert(path, to="nnx", template=template, progress=False)
    out = path.with_name("export-bridge.safetensors")
    start = time.perf_counter()
    with AnonPeak() as memory:
        bridge.save(
            model, out, format="safetensors", overwrite=True, progress=False, threads=threads
        )
    return time.perf_counter() - start, memory


def method_export_bridge_threads(path: Path, template, layers: int, dtype: str):
    return method_export_bridge(path, template, layers, dtype, threads="auto")


def method_export_save_file_fsync(path: Path, template, layers: int, dtype: str):
    """save_file, then the fsync bridge does to make its output durable before the
    rename that publishes it: the like-for-like baseline."""
    seconds, memory = method_export_save_file(path, template, layers, dtype)
    start = time.perf_counter()
    with open(path.with_name("export-save-file.safetensors"), "rb") as written:
        os.fsync(written.fileno())
    return seconds + time.perf_counter() - start, memory


def method_export_save_file(path: Path, template, layers: int, dtype: str):
    from flax import nnx
    from safetensors.numpy import save_file

    import bridge

    model = bridge.convert(path, to="nnx", template=template, progress=False)
    kernels = kernel_paths(model)
    out = path.with_name("export-save-file.safetensors")
    start = time.perf_counter()
    with AnonPeak() as memory:
        arrays = {}
        for parts, variable in nnx.to_flat_state(nnx.state(model)):
            name = ".".join(map(str, parts))
            array = np.asarray(variable.get_value())
            arrays[torch_key(name)] = np.ascontiguousarray(array.T) if name in kernels else array
        save_file(arrays, out, metadata={"format": "pt"})
    return time.perf_counter() - start, memory


METHODS = {
    "bridge": method_bridge,
    "bridge_threads": method_bridge_threads,
    "cat": method_cat,
    "eager": method_eager,
    "abstract": method_abstract,
    "floor_numpy": method_floor_numpy,
    "floor_jax": method_floor_jax,
    "export_bridge": method_export_bridge,
    "export_bridge_threads": method_export_bridge_threads,
    "export_save_file": method_export_save_file,
    "export_save_file_fsync": method_export_save_file_fsync,
}


def run_one(method: str, path: Path, layers: int, dtype: str) -> dict:
    """Measure one method in this (fresh) process; prints a JSON line."""
    import jax
    import safetensors.flax  # noqa: F401  (imports are part of the baseline, for every method)
    from flax import nnx

    import bridge  # noqa: F401

    jax.numpy.zeros(()).block_until_ready()
    template = nnx.eval_shape(lambda: build_model(layers, dtype, nnx.Rngs(0)))
    if method.startswith("export"):
        seconds, memory = METHODS[method](path, template, layers, dtype)
    else:
        start = time.perf_counter()
        with AnonPeak() as memory:
            result = METHODS[method](path, template, layers, dtype)
            jax.block_until_ready(
                jax.tree.leaves(nnx.state(result)) if isinstance(result, nnx.Module) else result
            )
        seconds = time.perf_counter() - start
    return {"method": method, "seconds": seconds, "growth": memory.peak - memory.base}


# --- the driver ----------------------------------------------------------------------------

LABELS = {
    "bridge": "(a) bridge.convert",
    "bridge_threads": '(a) bridge.convert, threads="auto"',
    "cat": "cat of the files (page cache)",
    "eager": "(b) eager init + assign",
    "abstract": "(c) eval_shape + load_file + assign",
    "floor_numpy": "(d) floor, numpy",
    "floor_jax": "(d) floor, jax",
}


def memcpy_bandwidth() -> float:
    """Bytes per second of one large numpy copy, the best of three."""
    source = np.ones(256 * 2**20 // 8)
    target = np.empty_like(source)
    best = min(_timed(np.copyto, target, source) for _ in range(3))
    return source.nbytes / best


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(method: str, path: Path, layers: int, dtype: str, repeat: int) -> dict | None:
    """A method in `repeat` fresh processes: the best time (the disk and page cache make
    single runs noisy here) and the worst memory growth. None where the method does not
    apply (safetensors' numpy reader and bfloat16)."""
    if method == "floor_numpy" and dtype == "bfloat16":
        return None
    command = [
        sys.executable,
        __file__,
        "--run",
        method,
        "--path",
        str(path),
        "--layers",
        str(layers),
        "--dtype",
        dtype,
    ]
    runs = []
    for _ in range(repeat):
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "method": method,
        "seconds": min(r["seconds"] for r in runs),
        "growth": max(r["growth"] for r in runs),
    }


def row(label: str, result: dict, baseline: dict | None, size: int, unit: str = "") -> str:
    ratio = f"{result['seconds'] / baseline['seconds']:.2f}{unit}" if baseline else "-"
    return (
        f"| {label} | {result['seconds']:.2f} | {ratio} | "
        f"{result['growth'] / 2**20:,.0f} MiB | {result['growth'] / size:.2f} |"
    )


def table(results: dict[str, dict | None], size: int, bandwidth: float) -> list[str]:
    floors = [results[m] for m in ("floor_numpy", "floor_jax") if results.get(m)]
    floor = min(floors, key=lambda r: r["seconds"]) if floors else None
    lines = [
        "| method | wall s | x floor | peak RssAnon growth | x checkpoint |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [row(label, results[m], floor, size) for m, label in LABELS.items() if results.get(m)]
    export, save_file = results.get("export_bridge"), results.get("export_save_file")
    if export and save_file:
        lines.append(row("export: bridge.save", export, save_file, size, " x save_file"))
        if threaded := results.get("export_bridge_threads"):
            lines.append(
                row(
                    'export: bridge.save, threads="auto"', threaded, save_file, size, " x save_file"
                )
            )
        lines.append(
            row(
                "export: save_file of the same arrays, torch layout",
                save_file,
                save_file,
                size,
                " x save_file",
            )
        )
    if export and (durable := results.get("export_save_file_fsync")):
        lines.append(
            row(
                "export: save_file + fsync (like for like)",
                durable,
                save_file,
                size,
                " x save_file",
            )
        )
    lines.append(
        f"\nCheckpoint {size / 1e9:.2f} GB; memcpy {bandwidth / 1e9:.1f} GB/s, so "
        f"copying its bytes once takes {size / bandwidth:.2f} s."
    )
    return lines


def machine() -> str:
    import flax
    import jax
    import safetensors

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB; Python "
        f"{platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
        f"safetensors {safetensors.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--record", action="store_true", help="write into benchmarks/RESULTS.md")
    parser.add_argument("--shard-gb", type=float, help="write HF-style shards of this size")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method (best time)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, Path(args.path), args.layers, args.dtype)))
        return

    report = [
        f"Machine: {machine()}",
        "",
        f"Command: `python benchmarks/bench_load.py --size-gb {args.size_gb} --repeat "
        f"{args.repeat}` (`make bench`); each method runs in fresh processes, best time of "
        f"{args.repeat}, worst memory",
        "",
    ]
    bandwidth = memcpy_bandwidth()
    for dtype in args.dtypes:
        itemsize = 2 if dtype == "bfloat16" else 4
        layers = layer_count(args.size_gb, itemsize)
        with tempfile.TemporaryDirectory() as workdir:
            path = Path(workdir) / ("model" if args.shard_gb else "model.safetensors")
            size = generate(path, layers, dtype, args.shard_gb)
            results = {}
            for method in args.methods:
                results[method] = measure(method, path, layers, dtype, args.repeat)
                print(f"{dtype} {method}: {results[method]}", file=sys.stderr, flush=True)
        report += [f"### {dtype}, {layers} layers", "", *table(results, size, bandwidth), ""]
    print("\n".join(report))
    if args.record:
        record("Scale check" if args.shard_gb else "Loads", "\n".join(report))


if __name__ == "__main__":
    main()
