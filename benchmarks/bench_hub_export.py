"""Export in the Hub's layout: bridge.save with a transformers template against the
model's own save_pretrained, which writes the same files.

    python benchmarks/bench_hub_export.py [--layers 4] [--repeat 3]

A random Mixtral (fused experts in memory, one tensor per expert on the Hub) of about
250 MB per 4 layers is built in each of fresh processes, one per method and repeat; each
writes a directory:

  save_pretrained:  model.save_pretrained(d)
  bridge.save:      bridge.save(model, d, format="safetensors", template=<meta twin>)

Wall time is the best of the repeats, memory the worst peak RssAnon growth above the
built model (bench_load.AnonPeak); ratios are to save_pretrained in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("save_pretrained", "bridge.save")


def run_one(method: str, layers: int) -> dict[str, float]:
    import torch
    import transformers
    from bench_load import AnonPeak

    import bridge

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        num_hidden_layers=layers,
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        vocab_size=8000,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.device("meta"):
        template = transformers.MixtralForCausalLM(config)
    with tempfile.TemporaryDirectory() as scratch, AnonPeak() as memory:
        start = time.perf_counter()
        if method == "save_pretrained":
            model.save_pretrained(scratch)
        else:
            bridge.save(model, Path(scratch) / "out", format="safetensors", template=template)
        wall = time.perf_counter() - start
    size = sum(tensor.nbytes for tensor in model.state_dict().values())
    return {"wall": wall, "memory": memory.peak - memory.base, "size": size}


def measure(method: str, layers: int, repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        command = [sys.executable, __file__, "--one", method, "--layers", str(layers)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "wall": min(run["wall"] for run in runs),
        "memory": max(run["memory"] for run in runs),
        "size": runs[0]["size"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.layers)))
        return
    results = {method: measure(method, args.layers, args.repeat) for method in METHODS}
    base = results["save_pretrained"]
    print(f"Mixtral, {args.layers} layers, {base['size'] / 1e6:.0f} MB of tensors")
    print("| method | wall s | x save_pretrained | peak RssAnon growth | x save_pretrained |")
    print("|---|---:|---:|---:|---:|")
    for method, result in results.items():
        print(
            f"| {method} | {result['wall']:.2f} | {result['wall'] / base['wall']:.2f} | "
            f"{result['memory'] / 2**20:,.0f} MiB | {result['memory'] / base['memory']:.2f} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
