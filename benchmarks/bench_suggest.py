"""Speed of `rules="auto"` (bridge.suggest) against name matching, as leaves grow.

    python benchmarks/bench_suggest.py [--leaves 5000 50000] [--record]

A synthetic Llama-style state in HF names (torch layout, biases everywhere: 16 leaves a
layer) against a template in Meta's names (`layers.{i}.attention.wq`), indexed layers
and scanned (stacked) layers; and the export: the scanned state in Meta's names onto the
HF template (`Unstack`). Leaves are abstract: suggesting reads no array data.
Measured in one process, best of `--repeat`:

  suggest:   bridge.suggest.suggest(source, template) -> the rules
  apply:     mapping.apply_rules of those rules to the source (what convert adds)
  baseline:  mapping.match of a source already in the names of an indexed template
             (what every convert with a template does), as many leaves

Ratios are to the baseline of the same size; the 10x-leaves row says how it scales.
`--record` writes the table into its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
from results import record

from bridge.mapping import apply_rules, match
from bridge.report import Report
from bridge.suggest import suggest
from bridge.tree import Leaf

HIDDEN, KV, INNER = 8, 4, 16
HF = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INNER, HIDDEN),
    "mlp.up_proj": (INNER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INNER),
}
META = dict(
    zip(
        HF,
        [*(f"attention.w{x}" for x in "qkvo"), *(f"feed_forward.w{x}" for x in "132")],
        strict=True,
    )
)
LEAVES_PER_LAYER = 2 * len(HF) + 2


def _leaf(shape: tuple[int, ...], module: str | None = None) -> Leaf:
    return Leaf(jax.ShapeDtypeStruct(shape, np.float32), module=module)


def states(layers: int, scanned: bool) -> tuple[dict, dict]:
    """(source in HF names, template in Meta names)."""
    source, template = {}, {}
    for i in range(layers):
        for hf, (out, inp) in HF.items():
            parent = ("model", "layers", i, *hf.split("."))
            source[(*parent, "weight")] = _leaf((out, inp), "Linear")
            source[(*parent, "bias")] = _leaf((out,), "Linear")
        for name in ("input_layernorm", "post_attention_layernorm"):
            source[("model", "layers", i, name, "weight")] = _leaf((HIDDEN,), "Norm")
    for hf, meta in META.items():
        out, inp = HF[hf]
        for role, shape in (("kernel", (inp, out)), ("bias", (out,))):
            for i in [None] if scanned else range(layers):
                path = ("layers", *([] if scanned else [i]), *meta.split("."), role)
                template[path] = _leaf(((layers,) if scanned else ()) + shape, "Linear")
    for name in ("attention_norm", "ffn_norm"):
        for i in [None] if scanned else range(layers):
            template[("layers", *([] if scanned else [i]), name, "scale")] = _leaf(
                ((layers,) if scanned else ()) + (HIDDEN,), "Norm"
            )
    return source, template


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(leaves: int, kind: str, repeat: int) -> dict[str, float]:
    layers = max(1, leaves // LEAVES_PER_LAYER)
    source, template = states(layers, scanned=kind != "indexed")
    crossing = "flax"
    if kind == "scanned export":
        source, template, crossing = template, source, "torch"
    _, indexed = states(layers, scanned=False)  # the baseline: as many leaves, same names
    same = {path: leaf.replace(source=".".join(map(str, path))) for path, leaf in indexed.items()}
    found = suggest(source, template, crossing)
    assert found.ok and not found.unpaired, str(found)
    return {
        "leaves": max(len(source), len(template)),
        "suggest": best(lambda: suggest(source, template, crossing), repeat),
        "apply": best(lambda: apply_rules(source, found.rules, Report()), repeat),
        "baseline": best(lambda: match(same, indexed, Report()), repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    lines = [
        "| case | leaves | suggest s | x match | apply rules s | x match | "
        "match s (baseline) | suggest x per 10x leaves |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("indexed", "scanned", "scanned export"):
        previous = None
        for leaves in args.leaves:
            row = measure(leaves, kind, args.repeat)
            growth = "-" if previous is None else f"{row['suggest'] / previous:.1f}"
            previous = row["suggest"]
            lines.append(
                f"| {kind} | {row['leaves']:,} "
                f"| {row['suggest']:.3f} | {row['suggest'] / row['baseline']:.2f} "
                f"| {row['apply']:.3f} | {row['apply'] / row['baseline']:.2f} "
                f"| {row['baseline']:.3f} | {growth} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.record:
        machine = platform.processor() or platform.machine()
        body = f"{machine}, best of {args.repeat}, abstract leaves (no data read).\n\n{table}"
        record('rules="auto": suggestion speed', body)


if __name__ == "__main__":
    main()
