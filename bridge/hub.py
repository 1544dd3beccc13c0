"""transformers models as templates: their files in the Hub's layout, as `save_pretrained`
writes them and `from_pretrained` (4.x and 5.x) reads them.

transformers 5 keeps some tensors in memory under other names, or fused, than its
checkpoints hold them (ViT's `q_proj` is `attention.attention.query` on the Hub, the
experts of a Mixtral layer are one `gate_up_proj` in memory and `experts.<i>.w1/w3` on
the Hub). An export with a transformers template writes what `save_pretrained` writes:
tied weights once, kept under the name transformers' own `remove_tied_weights_from_state_dict`
keeps, then transformers' own `revert_weight_conversion`; `config.json` (and
`generation_config.json`) beside them. A load renames and fuses the Hub's tensors with the
model's conversion mapping as `from_pretrained` does. The mapping is transformers', never
a copy: every renamed, fused or split tensor says so in the plan and the report.

Imported only when a template (or the source) is a transformers model: the torch adapter
asks `checkpoint(obj)`.
"""

from __future__ import annotations

import copy
import functools
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path as FilePath
from typing import Any

import numpy as np

from bridge.errors import FormatError
from bridge.formats.torch import from_numpy, to_numpy
from bridge.graph import Checkpoint, Context
from bridge.tree import FlatState, Leaf, Path, as_numpy, dotted, parse_dotted


def checkpoint(obj: Any) -> Checkpoint | None:
    """The Hub layout of a transformers 5 `PreTrainedModel`; None for any other object,
    and with transformers 4, whose models hold their checkpoint names."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(obj, transformers.PreTrainedModel):
        return None
    try:
        import transformers.core_model_loading  # transformers 5: its weight conversions
    except ImportError:
        return None
    return Checkpoint(
        to_files=functools.partial(to_hub, obj),
        from_files=functools.partial(from_hub, obj),
        companions=functools.partial(companions, obj),
    )


def rule(model: Any) -> str:
    """The declared rule every renamed, fused or split tensor names."""
    return f"transformers checkpoint mapping of {type(model).__name__}"


def _meta(leaf: Leaf) -> Any:
    """A meta tensor of a leaf's shape and dtype: what transformers' operations need to
    name and shape their results, with no data."""
    import torch

    dtype = from_numpy(np.zeros(0, leaf.dtype)).dtype
    return torch.empty(leaf.shape, dtype=dtype, device="meta")


def _tensor(key: str, leaf: Leaf) -> Any:
    """A leaf as a torch tensor sharing its data where numpy allows; a meta tensor for a
    placeholder (plans)."""
    return _meta(leaf) if leaf.is_abstract else from_numpy(as_numpy(key, leaf.value))


def _joined(*steps: str) -> str:
    return ", ".join(step for step in steps if step)


def _untied(model: Any, state: Mapping[str, Leaf], ctx: Context) -> dict[str, Leaf]:
    """`state` less the tied weights `save_pretrained` leaves out (and its
    `_keys_to_ignore_on_save`). Which name of a tied pair stays is transformers' choice,
    asked of `remove_tied_weights_from_state_dict` on the model's own tensors; a dropped
    name must hold the kept one's values, else the export would lose them."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    ignored = set(model._keys_to_ignore_on_save or ())
    tensors = {key: t for key, t in model.state_dict().items() if key not in ignored}
    try:
        kept = remove_tied_weights_from_state_dict(dict(tensors), model)
    except RuntimeError as error:  # tensors shared in a way the model does not declare
        raise FormatError(f"{type(model).__name__}: {error}") from None
    owners = {
        key: id(tensor)
        for named in (model.named_parameters, model.named_buffers)
        for key, tensor in named(remove_duplicate=False)
    }
    holders = {owners.get(key, key): key for key in kept}
    out: dict[str, Leaf] = {}
    for key, leaf in state.items():
        if key in ignored:
            ctx.report.notes.append(f"{key}: left out, as save_pretrained leaves it out")
            continue
        if key in kept or key not in tensors:
            out[key] = leaf
            continue
        holder = holders.get(owners.get(key, key))
        if holder is None or holder not in state:
            raise FormatError(
                f"{key}: save_pretrained of {type(model).__name__} leaves it out as tied, "
                "but bridge cannot tell which kept tensor holds its values"
            )
        _check_same(key, leaf, holder, state[holder])
        ctx.report.notes.append(f"{key}: tied to {holder}, stored once, as save_pretrained does")
    return out


def _check_same(key: str, leaf: Leaf, holder: str, kept: Leaf) -> None:
    """Refuse to drop a tied name whose values differ from the name that stays."""
    if leaf.value is kept.value or leaf.is_abstract or kept.is_abstract:
        return
    mine, theirs = as_numpy(key, leaf.value), as_numpy(holder, kept.value)
    if (
        mine.shape != theirs.shape
        or mine.dtype != theirs.dtype
        or mine.tobytes() != theirs.tobytes()
    ):
        raise FormatError(
            f"{key}: the template ties it to {holder!r}, which save_pretrained stores "
            "alone, but the source holds other values under the two names; untie them in "
            "the template (tie_word_embeddings=False) to keep both"
        )


def to_hub(model: Any, flat: FlatState, ctx: Context) -> FlatState:
    """A state keyed by `model`'s own names -> the keys, shapes and tensors
    `model.save_pretrained` writes, in its order.

    transformers' `revert_weight_conversion` runs twice: on meta tensors of every leaf,
    which names the outputs (a renamed tensor comes back as the very input), then on the
    data of the tensors it splits or fuses only. Renamed leaves keep their (lazy) values;
    the others are transformers' views or new arrays."""
    from transformers.core_model_loading import revert_weight_conversion

    state = _untied(model, {dotted(path): leaf for path, leaf in flat.items()}, ctx)
    placeholders = {key: _meta(leaf) for key, leaf in state.items()}
    names = revert_weight_conversion(model, dict(placeholders))
    by_id = {id(tensor): key for key, tensor in placeholders.items()}
    renamed = {name: by_id[id(tensor)] for name, tensor in names.items() if id(tensor) in by_id}
    converted = [key for key in state if key not in set(renamed.values())]
    inputs = {key: _tensor(key, state[key]) for key in converted}
    made = revert_weight_conversion(model, dict(inputs)) if inputs else {}
    if set(made) != set(names) - set(renamed):
        raise FormatError(
            f"{rule(model)}: run on the tensors it converts alone ({converted[:3]}, ...), it "
            f"names other outputs ({sorted(set(made) ^ (set(names) - set(renamed)))[:3]}) "
            "than on the whole model; bridge cannot lay out this model's files"
        )
    origins = _origins(model, placeholders, converted)
    out: FlatState = {}
    for name in names:
        if name in renamed:
            key = renamed[name]
            leaf = state[key]
            if name != key:
                leaf = leaf.replace(transform=_joined(leaf.transform, f"renamed by {rule(model)}"))
                ctx.report.notes.append(f"{key}: written as {name} ({rule(model)})")
        else:
            tensor = made[name][0] if isinstance(made[name], list) else made[name]
            key = origins.get(name)
            origin = state[key] if key else Leaf(None, source=", ".join(converted))
            leaf = Leaf(
                to_numpy(tensor),
                source=origin.source,
                transform=_joined(origin.transform, f"converted by {rule(model)}"),
            )
        out[parse_dotted(name)] = leaf
    if converted:
        ctx.report.notes.append(
            f"{len(converted)} tensors ({converted[0]}, ...) written as "
            f"{len(names) - len(renamed)} by {rule(model)}, as save_pretrained does"
        )
    return out


def _origins(model: Any, placeholders: Mapping[str, Any], converted: list[str]) -> dict[str, str]:
    """`{output name: the one input it is made of}`, for plans and reports: each converted
    tensor's meta placeholder reverted alone names its outputs. An output that no input
    names alone, or several do (a fusion), is left out."""
    from transformers.core_model_loading import revert_weight_conversion

    claims: dict[str, list[str]] = {}
    for key in converted:
        try:
            names = revert_weight_conversion(model, {key: placeholders[key]})
        except (ValueError, RuntimeError, KeyError, IndexError, StopIteration):
            continue  # a fusion needs its other inputs too
        for name in names:
            claims.setdefault(name, []).append(key)
    return {name: keys[0] for name, keys in claims.items() if len(keys) == 1}


def from_hub(model: Any, flat: FlatState, ctx: Context) -> FlatState:
    """A state keyed as a checkpoint of `model` may be (Hub names, per-expert tensors)
    -> `model`'s own names, renamed and fused as `from_pretrained` does with the model's
    conversion mapping (legacy names included). A key whose new name the model lacks, or
    that is one of the model's names already, stays as it is, for matching to judge."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    own = dict(model.state_dict())
    keys = {dotted(path): path for path in flat}
    out: FlatState = {}
    groups: dict[str, Any] = {}
    for key in sorted(keys, key=dot_natural_key):
        leaf = flat[keys[key]]
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if key in own or name not in own:
            out[_unique(keys[key], out, key)] = leaf
        elif pattern is None:
            ctx.report.notes.append(f"{key}: read as {name} ({rule(model)})")
            out[_unique(parse_dotted(name), out, key)] = leaf.replace(
                transform=_joined(leaf.transform, f"renamed by {rule(model)}")
            )
        else:
            group = groups.setdefault(name, copy.deepcopy(by_pattern[pattern]))
            group.add_tensor(name, key, pattern, _tensor(key, leaf))
    for name, group in groups.items():
        sources = sorted(group.layer_targets[name], key=dot_natural_key)
        for target, tensor in group.convert(name, model=model, config=model.config).items():
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            out[_unique(parse_dotted(target), out, sources[0])] = Leaf(
                to_numpy(tensor),
                source=flat[keys[sources[0]]].source or sources[0],
                transform=f"{len(sources)} tensors ({sources[0]}, ...) fused by {rule(model)}",
            )
        ctx.report.notes.append(
            f"{len(sources)} tensors ({sources[0]}, ...) read as {name} ({rule(model)})"
        )
    return out


def _unique(path: Path, out: FlatState, key: str) -> Path:
    """`path`, unless a tensor read before already took it: a source holding one tensor
    under both its Hub and its in-memory name is ambiguous."""
    if path in out:
        raise FormatError(
            f"{key}: read as {dotted(path)} by the model's checkpoint mapping, a name another "
            f"tensor of the source also takes ({out[path].source or dotted(path)!r})"
        )
    return path


def companions(model: Any, flat: FlatState, ctx: Context) -> dict[str, bytes]:
    """`config.json` (and `generation_config.json` for a model that generates) as
    `save_pretrained` writes them, the dtype being the export's; none with `config=False`.
    The template's config is copied, never changed."""
    if not ctx.options.get("config", True):
        return {}
    config = copy.deepcopy(model.config)
    floating = next((leaf.dtype for leaf in flat.values() if _is_float(leaf.dtype)), None)
    if floating is not None:
        config.dtype = str(from_numpy(np.zeros(0, floating)).dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    with tempfile.TemporaryDirectory(prefix="bridge-config-") as scratch:
        config.save_pretrained(scratch)
        if model.can_generate():
            copy.deepcopy(model.generation_config).save_pretrained(scratch)
        return {path.name: path.read_bytes() for path in sorted(FilePath(scratch).iterdir())}


def _is_float(dtype: Any) -> bool:
    try:
        return np.dtype(dtype).kind == "f" or "float" in np.dtype(dtype).name
    except TypeError:
        return False
