"""Linen training checkpoints -> an NNX model and optimizer that resume where they stopped.

A Linen `TrainState` (as `flax.training.train_state` writes it: `step`, `params`, maybe
`batch_stats`, and the optax `opt_state` whose moments mirror `params`) carries the same
numbers an `nnx.Optimizer` holds, under other names: collections first, list items as
`layers_0`, optax tuples as `"0"`, `"1"`. Matching by the spelling-independent key (see
`tree.match_key`) pairs them once digit strings are read as tuple positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx, serialization

from bridge.api import convert
from bridge.graph import GRAPH, Context
from bridge.tree import TRAINING_FIELDS, FlatState, flatten_mapping, positions, unflatten_mapping


def _read(checkpoint: Any, source: str | None, options: dict[str, Any]) -> FlatState:
    """The checkpoint as flat leaves: a path or bytes through its format, a TrainState
    or its state dict directly."""
    if (
        source is None
        and not isinstance(checkpoint, dict | bytes | str)
        and not hasattr(checkpoint, "__fspath__")
    ):
        checkpoint = serialization.to_state_dict(checkpoint)  # a TrainState object
    if isinstance(checkpoint, dict) and source is None:
        return {tuple(path): value for path, value in flatten_mapping(checkpoint).items()}
    name = source or GRAPH.detect(checkpoint)
    context = Context(options={**options, "training": True}, source=name)
    flat = GRAPH.format(name).read(checkpoint, context)
    return {
        (*((leaf.kind,) if leaf.kind else ()), *path): leaf.value for path, leaf in flat.items()
    }


def migrate(
    checkpoint: Any,
    *,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    source: str | None = None,
    **options: Any,
) -> nnx.Module | tuple[nnx.Module, nnx.Optimizer]:
    """A Linen training checkpoint -> the NNX `model` (a template, abstract or not) and,
    when an `optimizer` template is given (an `nnx.Optimizer` built for that model with
    the same optax transformation), the optimizer with its state and step carried over.

    `checkpoint` is a TrainState, its state dict, or a path / bytes any registered
    checkpoint format reads (Orbax, msgpack). The step is cast to the optimizer's dtype
    (Linen keeps a Python int, NNX a uint32); every other leaf must match exactly, or
    `MismatchError` lists what does not.
    """
    flat = _read(checkpoint, source, options)
    variables = unflatten_mapping(
        {path: value for path, value in flat.items() if path[0] not in TRAINING_FIELDS}
    )
    migrated = convert(variables, "nnx", source="linen", template=model)
    if optimizer is None:
        return migrated
    step_dtype = nnx.state(optimizer)["step"].get_value().dtype
    training = {
        positions(path): np.asarray(value, step_dtype) if path == ("step",) else value
        for path, value in flat.items()
        if path[0] in TRAINING_FIELDS
    }
    restored = convert(unflatten_mapping(training), "nnx", source="nnx_state", template=optimizer)
    return migrated, restored
