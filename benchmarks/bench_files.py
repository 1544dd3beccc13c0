"""File-to-file conversions and Orbax loads: time and memory of bridge against the
load-then-save recipe, side by side in one run.

    python benchmarks/bench_files.py [--size-gb 1.0] [--repeat 3] [--record]

Uses bench_load's synthetic Llama-style checkpoint (float32, HF names, torch layout) and
its measure of memory: the peak of anonymous resident memory (RssAnon) above the
process's baseline once jax is imported and the template built, each case in a fresh
process (best time, worst memory over `--repeat` runs).

  safetensors -> Orbax   bridge.save(file, ckpt, format="orbax", template=abstract model),
                         which streams in batches, against the recipe: bridge.convert to
                         NNX, then ocp.StandardCheckpointer().save(ckpt, nnx.state(model))
  Orbax -> safetensors   bridge.save(ckpt, file, format="safetensors"), streamed, against
                         ocp.StandardCheckpointer().restore(ckpt) then save_file
  Orbax load             bridge.convert(ckpt, to="nnx", template=abstract model) against
                         ocp.StandardCheckpointer().restore(ckpt, nnx.state(template))

The Orbax checkpoint read is one the recipe wrote, or where the recipe is not among
`--cases` (as in `make bench-large`) bridge's streamed one: a standard v0 checkpoint
both. `--record` writes the tables into their section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_load import AnonPeak, build_model, generate, layer_count, machine
from results import record


def _template(layers: int):
    from flax import nnx

    return nnx.eval_shape(lambda: build_model(layers, "float32", nnx.Rngs(0)))


def case_st_to_orbax(source: Path, out: Path, template, batch: str | None) -> None:
    import bridge

    options = {"batch_bytes": batch} if batch else {}
    bridge.save(source, out, format="orbax", template=template, progress=False, **options)


def case_st_to_orbax_recipe(source: Path, out: Path, template, batch: str | None) -> None:
    import orbax.checkpoint as ocp
    from flax import nnx

    import bridge

    model = bridge.convert(source, to="nnx", template=template, progress=False)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out.absolute(), nnx.state(model))


def case_orbax_to_st(source: Path, out: Path, template, batch: str | None) -> None:
    import bridge

    options = {"batch_bytes": batch} if batch else {}
    bridge.save(source, out, format="safetensors", progress=False, **options)


def case_orbax_to_st_recipe(source: Path, out: Path, template, batch: str | None) -> None:
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import traverse_util
    from safetensors.numpy import save_file

    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(source.absolute())
    flat = traverse_util.flatten_dict(tree, sep=".")
    save_file({key: np.asarray(value) for key, value in flat.items()}, out)


def case_orbax_load(source: Path, out: Path, template, batch: str | None):
    import bridge

    options = {"batch_bytes": batch} if batch else {}
    return bridge.convert(source, to="nnx", template=template, progress=False, **options)


def case_orbax_load_recipe(source: Path, out: Path, template, batch: str | None):
    import orbax.checkpoint as ocp
    from flax import nnx

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(source.absolute(), nnx.state(template))


CASES = {
    "st_to_orbax": case_st_to_orbax,
    "st_to_orbax_recipe": case_st_to_orbax_recipe,
    "orbax_to_st": case_orbax_to_st,
    "orbax_to_st_recipe": case_orbax_to_st_recipe,
    "orbax_load": case_orbax_load,
    "orbax_load_recipe": case_orbax_load_recipe,
}
TABLES = {
    "safetensors -> Orbax": [
        ("bridge.save, streamed", "st_to_orbax"),
        ("recipe: bridge.convert to NNX + StandardCheckpointer.save", "st_to_orbax_recipe"),
    ],
    "Orbax -> safetensors": [
        ("bridge.save, streamed", "orbax_to_st"),
        ("recipe: StandardCheckpointer.restore + save_file", "orbax_to_st_recipe"),
    ],
    "Orbax -> NNX (load)": [
        ("bridge.convert", "orbax_load"),
        ("recipe: StandardCheckpointer.restore into the abstract state", "orbax_load_recipe"),
    ],
}


def run_one(case: str, source: Path, out: Path, layers: int, batch: str | None) -> dict:
    """Measure one case in this (fresh) process."""
    import jax
    import orbax.checkpoint  # noqa: F401  (imports are part of the baseline, for every case)
    import safetensors.flax  # noqa: F401

    import bridge  # noqa: F401

    jax.numpy.zeros(()).block_until_ready()
    template = None if case.startswith("orbax_to_st") else _template(layers)  # unused there
    start = time.perf_counter()
    with AnonPeak() as memory:
        result = CASES[case](source, out, template, batch)
        jax.block_until_ready(jax.tree.leaves(result))
    return {"seconds": time.perf_counter() - start, "growth": memory.peak - memory.base}


def measure(
    case: str, source: Path, out: Path, layers: int, batch: str | None, repeat: int, keep: bool
) -> dict:
    """`case` run `repeat` times in fresh processes; the last run's output is deleted
    unless `keep`."""
    command = [sys.executable, __file__, "--run", case, "--source", str(source)]
    command += ["--out", str(out), "--layers", str(layers)]
    command += ["--batch", batch] if batch else []
    runs = []
    for _ in range(repeat):
        subprocess.run(["rm", "-rf", str(out)], check=True)
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, timeout=3600)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not keep:
        subprocess.run(["rm", "-rf", str(out)], check=True)
    result = {
        "seconds": min(r["seconds"] for r in runs),
        "growth": max(r["growth"] for r in runs),
    }
    print(f"{case}: {result}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--shard-gb", type=float, help="write HF-style shards of this size")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (best time)")
    parser.add_argument("--batch", help="bridge's batch_bytes (default: bridge's)")
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--record", action="store_true", help="add to benchmarks/RESULTS.md")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        result = run_one(args.run, Path(args.source), Path(args.out), args.layers, args.batch)
        print(json.dumps(result))
        return

    layers = layer_count(args.size_gb, 4)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        weights = work / ("model" if args.shard_gb else "model.safetensors")
        size = generate(weights, layers, "float32", args.shard_gb)
        checkpoint = work / "ckpt"
        # the Orbax cases read the recipe's checkpoint (v0; the load recipe restores into
        # nnx.state's structure), or where no recipe is run (too large to load whole)
        # bridge's streamed one: the last run's output kept
        recipes = {"st_to_orbax_recipe", "orbax_load_recipe"} & set(args.cases)
        maker = "st_to_orbax_recipe" if recipes else "st_to_orbax"
        for case in args.cases:
            if case.startswith("orbax") and not checkpoint.exists():
                subprocess.run(
                    [sys.executable, __file__, "--run", maker, "--source", str(weights),
                     "--out", str(checkpoint), "--layers", str(layers)],
                    check=True, stdout=subprocess.DEVNULL, timeout=3600,
                )  # fmt: skip
            source = checkpoint if case.startswith("orbax") else weights
            keep = case == maker and not checkpoint.exists()
            out = checkpoint if keep else work / ("out.safetensors" if "to_st" in case else "out")
            results[case] = measure(case, source, out, layers, args.batch, args.repeat, keep)

    lines = [
        f"Machine: {machine()}",
        "",
        f"Command: `python benchmarks/bench_files.py --size-gb {args.size_gb} --repeat "
        f"{args.repeat}"
        + (f" --shard-gb {args.shard_gb}" if args.shard_gb else "")
        + (f" --batch {args.batch}" if args.batch else "")
        + f"`; float32, {layers} layers, checkpoint {size / 1e9:.2f} GB; each case in fresh "
        f"processes, best time of {args.repeat}, worst memory",
        "",
    ]
    for title, rows in TABLES.items():
        rows = [(label, case) for label, case in rows if case in results]
        if not rows:
            continue
        baseline = results[rows[-1][1]]
        lines += [
            f"### {title}",
            "",
            "| method | wall s | x recipe | peak RssAnon growth | x checkpoint |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, case in rows:
            result = results[case]
            lines.append(
                f"| {label} | {result['seconds']:.2f} | "
                f"{result['seconds'] / baseline['seconds']:.2f} | "
                f"{result['growth'] / 2**20:,.0f} MiB | {result['growth'] / size:.2f} |"
            )
        lines.append("")
    print("\n".join(lines))
    if args.record:
        record("Scale check, file to file" if args.shard_gb else "File to file", "\n".join(lines))


if __name__ == "__main__":
    main()
