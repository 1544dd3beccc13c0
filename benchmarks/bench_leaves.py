"""Per-leaf cost of bridge against the do-it-yourself pytree code, at many small leaves.

    python benchmarks/bench_leaves.py [--leaves 1000 10000 50000] [--record]
    python benchmarks/bench_leaves.py --leaves 10000 --ops torch_nnx --profile

The model is `blocks.{i}.lin.{kernel (3, 2), bias (2,)}`: two leaves per block, so that
the bytes are negligible and what is measured is the cost per leaf. Each operation runs
in a fresh process against its do-it-yourself counterpart (`nnx.state` /
`traverse_util` flatten-unflatten plus the same array placement, `jnp.asarray`);
the ratio is bridge / DIY from the same run. Each timed call ends with `gc.collect()`
on both sides: bridge pauses Python's cyclic collector while it builds objects, and
what the pause puts off (one scan of what the call made) is paid inside the timing.
The template is built from `nnx.Param(ShapeDtypeStruct)` leaves: `nnx.eval_shape` of
the same model takes 100 s for 1,000 leaves on this machine (Flax traces every
initializer), which would dwarf what is measured. `--profile` prints the cProfile of
the bridge side instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_load import AnonPeak, machine
from results import record

IN, OUT = 3, 2


def template(leaves: int):
    """An abstract model of `leaves` leaves (kernel and bias per block)."""
    import jax
    from flax import nnx

    class Linear(nnx.Linear):
        def __init__(self) -> None:  # abstract, like nnx.eval_shape's, without tracing
            self.kernel = nnx.Param(jax.ShapeDtypeStruct((IN, OUT), np.float32))
            self.bias = nnx.Param(jax.ShapeDtypeStruct((OUT,), np.float32))

    class Block(nnx.Module):
        def __init__(self) -> None:
            self.lin = Linear()

    class Many(nnx.Module):
        def __init__(self, blocks: int) -> None:
            self.blocks = nnx.List([Block() for _ in range(blocks)])

    return Many(leaves // 2)


def state_dict(leaves: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in range(leaves // 2):
        out[f"blocks.{i}.lin.weight"] = rng.standard_normal((OUT, IN), np.float32)
        out[f"blocks.{i}.lin.bias"] = rng.standard_normal((OUT,), np.float32)
    return out


# --- do-it-yourself counterparts -----------------------------------------------------------


def diy_fill(model, value_of):
    """nnx.split, one value per flat path, nnx.merge: what a hand-written loader does."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    filled = [
        (path, variable.replace(value=jnp.asarray(value_of(path))))
        for path, variable in nnx.to_flat_state(state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def torch_key(path) -> tuple[str, bool]:
    """NNX path -> (torch key, transpose?) for this model."""
    stem = ".".join(map(str, path[:-1]))
    return (f"{stem}.weight", True) if path[-1] == "kernel" else (f"{stem}.bias", False)


def diy_torch_nnx(setup):
    sd, model = setup["sd"], setup["template"]

    def value_of(path):
        key, transpose = torch_key(path)
        return sd[key].T if transpose else sd[key]

    return diy_fill(model, value_of)


def diy_safetensors_nnx(setup):
    from safetensors import safe_open

    with safe_open(setup["file"], framework="numpy") as file:

        def value_of(path):
            key, transpose = torch_key(path)
            array = file.get_tensor(key)
            return array.T if transpose else array

        return diy_fill(setup["template"], value_of)


def diy_linen_nnx(setup):
    from flax import traverse_util

    flat = traverse_util.flatten_dict(setup["linen"]["params"])
    return diy_fill(setup["template"], lambda path: flat[("blocks_" + str(path[1]), *path[2:])])


def diy_nnx_linen(setup):
    import jax.numpy as jnp
    from flax import nnx, traverse_util

    flat = {
        ("blocks_" + str(path[1]), *path[2:]): jnp.asarray(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(setup["model"]))
    }
    return {"params": traverse_util.unflatten_dict(flat)}


def diy_inspect(setup):
    from safetensors import safe_open

    with safe_open(setup["file"], framework="numpy") as file:
        return [(key, file.get_slice(key).get_shape()) for key in file.keys()]  # noqa: SIM118


def diy_msgpack(setup):
    from flax import serialization

    variables = diy_nnx_linen(setup)
    path = Path(tempfile.mkdtemp(dir=setup["dir"])) / "diy.msgpack"
    path.write_bytes(serialization.to_bytes(variables))
    return path


# --- bridge --------------------------------------------------------------------------------


def bridge_op(op: str):
    import bridge

    return {
        "torch_nnx": lambda s: bridge.convert(
            s["sd"], to="nnx", template=s["template"], progress=False
        ),
        "safetensors_nnx": lambda s: bridge.convert(
            s["file"], to="nnx", template=s["template"], progress=False
        ),
        "linen_nnx": lambda s: bridge.convert(
            s["linen"], to="nnx", template=s["template"], progress=False
        ),
        "nnx_linen": lambda s: bridge.convert(s["model"], to="linen", progress=False),
        "plan": lambda s: bridge.plan(s["sd"], to="nnx", template=s["template"]),
        "inspect": lambda s: bridge.inspect(s["file"]),
        "msgpack": lambda s: bridge.save(
            s["model"],
            Path(tempfile.mkdtemp(dir=s["dir"])) / "bridge.msgpack",
            format="msgpack",
            progress=False,
        ),
    }[op]


DIY = {
    "torch_nnx": diy_torch_nnx,
    "safetensors_nnx": diy_safetensors_nnx,
    "linen_nnx": diy_linen_nnx,
    "nnx_linen": diy_nnx_linen,
    "plan": diy_torch_nnx,  # a plan moves no data: compared with the conversion itself
    "inspect": diy_inspect,
    "msgpack": diy_msgpack,
}
OPS = list(DIY)


NEEDS = {  # the inputs each operation takes, so a process builds only those
    "torch_nnx": ("sd", "template"),
    "safetensors_nnx": ("file", "template"),
    "linen_nnx": ("linen", "template"),
    "nnx_linen": ("model",),
    "plan": ("sd", "template"),
    "inspect": ("file",),
    "msgpack": ("model", "dir"),
}


def setup(op: str, leaves: int, workdir: str) -> dict:
    """The inputs of `op`, built outside the timed region (at 50,000 leaves building
    every input for every operation would take longer than the operations)."""
    from safetensors.numpy import save_file

    import bridge

    inputs: dict = {"dir": workdir}
    needs = set(NEEDS[op])
    if needs & {"sd", "file", "model", "linen"}:
        inputs["sd"] = state_dict(leaves)
    if "file" in needs:
        inputs["file"] = str(Path(workdir) / "model.safetensors")
        if not Path(inputs["file"]).exists():
            save_file(inputs["sd"], inputs["file"])
    if needs & {"model", "linen"}:
        inputs["model"] = diy_torch_nnx({"sd": inputs["sd"], "template": template(leaves)})
    if "linen" in needs:
        inputs["linen"] = diy_nnx_linen(inputs)
    if "template" in needs:
        inputs["template"] = template(leaves)
    bridge.convert(state_dict(4), to="nnx", template=template(4), progress=False)  # warm
    return {name: inputs[name] for name in NEEDS[op]}


def run_one(side: str, op: str, leaves: int, workdir: str, profile: bool) -> dict:
    import jax

    inputs = setup(op, leaves, workdir)
    fn = DIY[op] if side == "diy" else bridge_op(op)
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(fn, inputs)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumtime").print_stats(45)
    start = time.perf_counter()
    with AnonPeak() as memory:
        jax.block_until_ready(jax.tree.leaves(fn(inputs)))
        gc.collect()  # what a collector paused inside the call put off is paid here
    return {"seconds": time.perf_counter() - start, "growth": memory.peak - memory.base}


def measure(op: str, leaves: int, workdir: str, repeat: int) -> dict[str, dict]:
    """Median time and worst growth per side, the sides alternating run by run so that
    both meet the same load on a shared machine."""
    runs: dict[str, list[dict]] = {"bridge": [], "diy": []}
    for _ in range(repeat):
        for side in runs:
            command = [sys.executable, __file__, "--run", side, "--ops", op]
            command += ["--leaves", str(leaves), "--workdir", workdir]
            done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        side: {
            "seconds": statistics.median(r["seconds"] for r in results),
            "growth": max(r["growth"] for r in results),
        }
        for side, results in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    parser.add_argument("--repeat", type=int, default=3, help="runs per side (median time)")
    parser.add_argument("--profile", action="store_true", help="cProfile the bridge side")
    parser.add_argument("--record", action="store_true", help="write into benchmarks/RESULTS.md")
    parser.add_argument("--run", choices=("bridge", "diy"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run or args.profile:
        workdir = args.workdir or tempfile.mkdtemp()
        side = args.run or "bridge"
        for op in args.ops:
            result = run_one(side, op, args.leaves[0], workdir, args.profile)
            print(json.dumps({"op": op, **result}), flush=True)
        return

    lines = [
        "| operation | leaves | bridge s | DIY s | x DIY | bridge growth | DIY growth |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for leaves in args.leaves:
        with tempfile.TemporaryDirectory() as workdir:
            for op in args.ops:
                sides = measure(op, leaves, workdir, args.repeat)
                ours, theirs = sides["bridge"], sides["diy"]
                lines.append(
                    f"| {op} | {leaves:,} | {ours['seconds']:.3f} | {theirs['seconds']:.3f} | "
                    f"{ours['seconds'] / theirs['seconds']:.2f} | "
                    f"{ours['growth'] / 2**20:,.1f} MiB | {theirs['growth'] / 2**20:,.1f} MiB |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
    report = [
        f"Machine: {machine()}",
        "",
        f"Each side in fresh processes, the sides alternating, median time of "
        f"{args.repeat}, worst memory.",
        "",
        *lines,
        "",
    ]
    print("\n".join(report))
    if args.record:
        record("Per-leaf cost", "\n".join(report))


if __name__ == "__main__":
    main()
