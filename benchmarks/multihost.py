"""Loads and saves under `jax.distributed`: 1 process with 8 CPU devices against 2
processes with 4 each, the same (2, 4) mesh and the same checkpoint.

    python benchmarks/multihost.py [--size-mb 256] [--record]

Writes a checkpoint of `--layers` sharded (in, out) kernels (torch layout, so each is
read through the transposed index) plus a replicated norm per layer, then runs the
program once per process count. Each process loads the safetensors file into the
sharded template, saves it to Orbax, to safetensors and to msgpack, and loads the Orbax
checkpoint back, every step timed between barriers; bytes read are bridge's own count of
the slices taken out of the file (`bridge.formats.safetensors.bytes_read`). The
single-file saves also record each process's peak RssAnon growth (sampled), to be set
against the largest array (what a gathering writer must hold) and the checkpoint.
`--record` writes the table into its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results import record

HIDDEN = 1024
DEVICES = 8
STEPS = ("load safetensors", "save orbax", "save safetensors", "save msgpack", "load orbax")
SINGLE_FILE = ("save safetensors", "save msgpack")
GATHERS = ("gather: bridge", "gather: jax process_allgather")
"""Every array gathered whole on the host, one at a time (bridge's first, so that it
pays what comes first): bridge spreads the copy over each process's devices."""
"""The saves process 0 writes alone, gathering: their memory is recorded too."""


def worker(port: str, processes: str, index: str, directory: str, layers: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES // int(processes)}"
    import jax

    if int(processes) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"localhost:{port}", num_processes=int(processes), process_id=int(index)
        )
    from bench_load import AnonPeak
    from flax import nnx
    from jax.experimental import multihost_utils

    import bridge
    from bridge import multihost
    from bridge.formats import safetensors as safetensors_format
    from bridge.stream import release_freed_memory

    class Stack(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
            scale = nnx.with_partitioning(nnx.initializers.ones, (None,))
            self.layers = nnx.List(
                [
                    nnx.Linear(HIDDEN, HIDDEN, use_bias=False, kernel_init=kernel, rngs=rngs)
                    for _ in range(int(layers))
                ]
            )
            self.norms = nnx.List(
                [nnx.RMSNorm(HIDDEN, scale_init=scale, rngs=rngs) for _ in range(int(layers))]
            )

    here = Path(directory)
    out = here / f"out{processes}"
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    template = nnx.merge(*nnx.get_abstract_model(lambda: Stack(nnx.Rngs(0)), mesh))
    times = {}
    growth = {}
    gathered = {}

    def timed(step: str, call):
        release_freed_memory()  # heap freed by earlier steps back to the system: a fair base
        multihost.peak_gathered_bytes = 0
        multihost_utils.sync_global_devices(f"before {step}")
        start = time.perf_counter()
        with AnonPeak() as memory:
            result = call()
        growth[step] = memory.peak - memory.base
        gathered[step] = multihost.peak_gathered_bytes
        jax.block_until_ready(jax.tree.leaves(nnx.state(result)) if step.startswith("load") else 0)
        multihost_utils.sync_global_devices(f"after {step}")
        times[step] = time.perf_counter() - start
        return result

    model = timed(
        "load safetensors",
        lambda: bridge.load(here / "model.safetensors", to="nnx", template=template),
    )
    read = safetensors_format.bytes_read
    timed("save orbax", lambda: bridge.save(model, out / "ckpt", format="orbax"))
    timed(
        "save safetensors",
        lambda: bridge.save(model, out / "model.safetensors", format="safetensors"),
    )
    timed("save msgpack", lambda: bridge.save(model, out / "model.msgpack", format="msgpack"))
    timed("load orbax", lambda: bridge.load(out / "ckpt", to="nnx", template=template))
    if int(processes) > 1:  # the gathers alone, every array once, one at a time
        arrays = jax.tree.leaves(nnx.state(model))
        primary = jax.process_index() == 0
        timed(GATHERS[0], lambda: [multihost._gather(a, keep=primary).size for a in arrays])
        timed(
            GATHERS[1],
            lambda: [
                np.asarray(multihost_utils.process_allgather(a, tiled=True)).size for a in arrays
            ],
        )
    result = {
        "index": int(index),
        "read": read,
        "times": times,
        "growth": growth,
        "gathered": gathered,
    }
    (out / f"result{index}.json").write_text(json.dumps(result))  # gloo logs into stdout


def run(processes: int, directory: Path, layers: int) -> tuple[float, list[dict]]:
    """Wall time of the whole program (start to last exit) and each process's results."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = str(probe.getsockname()[1])
    start = time.perf_counter()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                port,
                str(processes),
                str(index),
                str(directory),
                str(layers),
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for index in range(processes)
    ]
    try:
        outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    wall = time.perf_counter() - start
    assert all(worker.returncode == 0 for worker in workers), outputs
    results = directory / f"out{processes}"
    return wall, [json.loads((results / f"result{i}.json").read_text()) for i in range(processes)]


def table(size: int, largest: int, results: dict[int, tuple[float, list[dict]]]) -> str:
    base_wall, base = results[1]
    header = (
        "| processes | wall s (program) | bytes read per process | x checkpoint | "
        + " | ".join(f"{step} s" for step in STEPS)
        + " |"
    )
    lines = [header, "|" + "---:|" * (4 + len(STEPS))]
    memory = [
        "| processes | "
        + " | ".join(
            f"{step}: RssAnon growth per process | gathered arrays held at once"
            for step in SINGLE_FILE
        )
        + " |",
        "|" + "---:|" * (1 + 2 * len(SINGLE_FILE)),
    ]
    for count, (wall, per_process) in sorted(results.items()):
        reads = ", ".join(f"{r['read'] / 1e6:.1f} MB" for r in per_process)
        ratio = max(r["read"] for r in per_process) / size
        steps = [max(r["times"][step] for r in per_process) for step in STEPS]
        lines.append(
            f"| {count} | {wall:.1f} ({wall / base_wall:.2f}x) | {reads} | {ratio:.2f} | "
            + " | ".join(
                f"{value:.2f} ({value / max(r['times'][step] for r in base):.2f}x)"
                for value, step in zip(steps, STEPS, strict=True)
            )
            + " |"
        )
        cells = []
        for step in SINGLE_FILE:
            cells.append(
                ", ".join(
                    f"{r['growth'][step] / 1e6:.0f} MB ({r['growth'][step] / largest:.1f}x)"
                    for r in per_process
                )
            )
            held = per_process[0]["gathered"][step]
            cells.append(f"{held / 1e6:.1f} MB ({held / largest:.1f}x)" if count > 1 else "-")
        memory.append(f"| {count} | " + " | ".join(cells) + " |")
    gathers = [
        "| gathering every array once | time s | RssAnon growth per process |",
        "|---|---:|---:|",
    ]
    for step in GATHERS:
        per_process = results[2][1]
        growth = ", ".join(
            f"{r['growth'][step] / 1e6:.0f} MB ({r['growth'][step] / largest:.1f}x)"
            for r in per_process
        )
        seconds = max(r["times"][step] for r in per_process)
        gathers.append(f"| {step} (2 processes) | {seconds:.2f} | {growth} |")
    return "\n\n".join("\n".join(table) for table in (lines, memory, gathers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=256)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    layers = max(1, round(args.size_mb * 1e6 / (HIDDEN * HIDDEN * 4)))
    rng = np.random.default_rng(0)
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as scratch:
        directory = Path(scratch)
        state = {}
        for i in range(layers):
            state[f"layers.{i}.weight"] = rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32)
            state[f"norms.{i}.weight"] = rng.normal(size=HIDDEN).astype(np.float32)
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        size = sum(value.nbytes for value in state.values())
        largest = max(value.nbytes for value in state.values())
        del state
        results = {count: run(count, directory, layers) for count in (1, 2)}
    text = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; command: "
        f"`python benchmarks/multihost.py --size-mb {args.size_mb:g}`. A checkpoint of "
        f"{size / 1e6:.0f} MB ({layers} sharded (1024, 1024) float32 kernels read through "
        f"the transposed index, {layers} replicated norms) on one (2, 4) mesh of 8 CPU "
        "devices: 1 process holding all 8, or 2 processes of 4 (gloo). Step times are the "
        "slowest process's, between barriers; ratios to 1 process in the same run. Orbax "
        "saves split the writing between the processes; a single-file save is written by "
        "process 0, which gathers the arrays over gloo one at a time; their memory is the "
        "peak RssAnon growth of each process (sampled every 2 ms, the heap trimmed before "
        "each step) during the save, and the most bytes of gathered arrays process 0 held "
        "at once (`bridge.multihost.peak_gathered_bytes`), both against the largest array "
        f"({largest / 1e6:.1f} MB).\n\n" + table(size, largest, results)
    )
    print(text)
    if args.record:
        record("Many hosts", text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:])
    else:
        main()
