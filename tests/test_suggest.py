"""`rules="auto"`: rules suggested from structure, for NNX ports whose names differ.

The real proof is numerical: each port (tests/ported_models.py, names of public JAX
ports) loads the torch model through the suggested rules and computes its outputs.
Ties are refused, naming the modules; the suggested TOML reads back as the same rules
and converts through the CLI as the Python call does.
"""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx
from typer.testing import CliRunner

import bridge
from bridge.cli import app
from bridge.cli_options import load_rules
from tests import ported_models

BATCH, LENGTH = 2, 8


def _inputs(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    if name == "cnn":
        return {"x": rng.standard_normal((BATCH, 3, 6, 6)).astype(np.float32)}
    ids = rng.integers(1, 97, size=(BATCH, LENGTH))
    if name != "bert":
        return {"input_ids": ids}
    token_types = np.zeros_like(ids)
    token_types[:, 4:] = 1
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "token_type_ids": token_types, "attention_mask": mask}


def torch_outputs(name: str, model: torch.nn.Module) -> list[np.ndarray]:
    args = {key: torch.from_numpy(value) for key, value in _inputs(name).items()}
    with torch.no_grad():
        out = model(**args)
    if name == "cnn":
        return [out.numpy()]
    if name == "bert":
        return [out.last_hidden_state.numpy(), out.pooler_output.numpy()]
    return [out.logits.numpy()]


def nnx_outputs(name: str, model: nnx.Module) -> list[np.ndarray]:
    args = list(_inputs(name).values())
    if name == "cnn":
        return [np.asarray(model(args[0].transpose(0, 2, 3, 1)))]  # NCHW -> NHWC
    out = model(*args)
    return [np.asarray(o) for o in (out if isinstance(out, tuple) else [out])]


EVIDENCE = {
    # which evidence each port needs, at least: what makes it a test of that evidence
    "gpt2": {"fused", "role", "shape", "tree"},
    "llama": {"role", "shape", "tree"},
    "bert": {"fused", "role", "shape", "tree"},
    "cnn": {"shape", "order"},
}
RULE_KINDS = {"gpt2": bridge.Split, "llama": bridge.Stack, "bert": bridge.Merge}


@pytest.fixture(scope="module", params=ported_models.NAMES)
def ported(request):
    name = request.param
    return name, ported_models.torch_model(name), ported_models.template(name)


def test_a_port_with_other_names_loads_through_auto_rules_and_computes_torch_outputs(ported):
    name, torch_model, template = ported
    suggestion = bridge.suggest_rules(torch_model, template=template)
    print(f"\n{name}: leaf pairs by evidence {suggestion.counts()}")
    assert suggestion.ok and not suggestion.unpaired, str(suggestion)
    assert EVIDENCE[name] <= set(suggestion.counts())
    if name in RULE_KINDS:
        assert any(isinstance(rule, RULE_KINDS[name]) for rule in suggestion.rules)

    model = bridge.convert(torch_model, to="nnx", template=template, rules="auto")
    for got, expected in zip(
        nnx_outputs(name, model), torch_outputs(name, torch_model), strict=True
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)


def _pairs(suggestion: bridge.Suggestion) -> set[tuple[str, str]]:
    """(source module, template module) of every layer; a scanned template module also
    without its layer index."""
    out = set()
    for pairing in suggestion.pairings:
        for i in range(pairing.layers):
            for source in pairing.sources:
                for target in pairing.targets:
                    out.add((source.replace("{i}", str(i)), target.replace("{i}", str(i))))
                    out.add((source.replace("{i}", str(i)), target.replace(".{i}", "")))
    return out


def test_each_template_leaf_is_filled_from_its_paired_module_only(ported):
    _, torch_model, template = ported
    suggestion = bridge.suggest_rules(torch_model, template=template)
    sources = [key for p in suggestion.pairings for key in p.sources]
    targets = [key for p in suggestion.pairings for key in p.targets]
    assert len(sources) == len(set(sources)) and len(targets) == len(set(targets))
    plan = bridge.plan(torch_model, to="nnx", template=template, rules="auto")
    assert plan.report.ok, str(plan.report)
    assert plan.suggestion == suggestion and "suggested" in str(plan)
    pairs = _pairs(suggestion)
    filled = [row for row in plan.rows if row.source not in ("", "(template)")]
    assert filled
    for row in filled:
        for source in row.source.replace(" .. ", " + ").split(" + "):
            pair = (source.rsplit(".", 1)[0], row.target.rsplit(".", 1)[0])
            assert pair in pairs, row


GIVEN = {"gpt2": ("c_(attn|proj|fc)$", "Conv1D"), "bert": ("(query|key|value)$", "Linear")}
"""What a bare file cannot say: GPT-2's Conv1D layers; BERT's q/k/v, fused into one
kernel, (out, in) or (in, out)."""


def test_the_suggested_toml_reads_back_and_converts_through_the_cli_as_auto(ported, tmp_path):
    name, torch_model, template = ported
    state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
    if name == "gpt2":
        del state["lm_head.weight"]  # tied to the token embedding, saved once as HF does
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, source)
    options = []
    if name in GIVEN:  # a bare file does not say which layers are Conv1D, or Linear
        (tmp_path / "modules.toml").write_text(
            f'[modules]\n"{GIVEN[name][0]}" = "{GIVEN[name][1]}"\n'
        )
        options = ["--modules", str(tmp_path / "modules.toml")]
    factory = f"{ported_models.__file__}:{name}_template"
    args = ["plan", str(source), "--to", "nnx", "--template", factory, *options]
    toml = str(tmp_path / "rules.toml")
    done = CliRunner().invoke(app, [*args, "--suggest-rules", toml])  # in-process: fast
    assert done.exit_code == 0, done.output
    assert "suggested" in done.output

    rules, modules = load_rules(toml)
    extra = {"modules": dict([GIVEN[name]])} if name in GIVEN else {}
    auto = bridge.suggest_rules(str(source), template=template, **extra)
    assert rules == auto.rules and modules == auto.modules
    from_file = bridge.convert(
        str(source),
        to="nnx",
        template=template,
        rules=rules,
        modules={**extra.get("modules", {}), **modules},
    )
    from_auto = bridge.convert(str(source), to="nnx", template=template, rules="auto", **extra)
    mine, theirs = nnx.to_flat_state(nnx.state(from_file)), nnx.state(from_auto)
    for path, variable in mine:
        other = dict(nnx.to_flat_state(theirs))[path]
        assert np.asarray(variable.get_value()).tobytes() == np.asarray(other.get_value()).tobytes()

    done = CliRunner().invoke(app, [*args, "--rules", toml])
    assert done.exit_code == 0, done.output


# --- ties -----------------------------------------------------------------------------------


class TorchTwins(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)


class NnxTwins(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.left, self.right = nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)


def test_symmetric_siblings_are_a_tie_named_and_refused_until_a_hint_decides():
    torch.manual_seed(0)
    source, template = TorchTwins(), nnx.eval_shape(lambda: NnxTwins(nnx.Rngs(0)))
    suggestion = bridge.suggest_rules(source, template=template)
    assert not suggestion.ok and suggestion.rules == []
    assert [(t.sources, t.targets) for t in suggestion.ties] == [(("a", "b"), ("left", "right"))]
    with pytest.raises(bridge.MismatchError, match=r"a, b.*tie.*left, right.*hint"):
        bridge.convert(source, to="nnx", template=template, rules="auto")

    hints = [(r"^a\.", "right.")]
    suggestion = bridge.suggest_rules(source, template=template, hints=hints)
    assert suggestion.ok
    assert {(p.sources, p.targets, p.evidence) for p in suggestion.pairings} == {
        (("right",), ("right",), "hint"),
        (("b",), ("left",), "shape"),
    }
    model = bridge.convert(source, to="nnx", template=template, rules="auto", hints=hints)
    assert model.right.kernel.get_value().tobytes() == source.a.weight.detach().numpy().T.tobytes()
    assert model.left.bias.get_value().tobytes() == source.b.bias.detach().numpy().tobytes()


def test_siblings_numbered_on_one_side_only_are_a_tie():
    """`conv2, conv3` against `left, right`: the order is evident on one side only."""

    class Numbered(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    suggestion = bridge.suggest_rules(
        Numbered(), template=nnx.eval_shape(lambda: NnxTwins(nnx.Rngs(0)))
    )
    assert [(t.sources, t.targets) for t in suggestion.ties] == [
        (("fc1", "fc2"), ("left", "right"))
    ]


def test_modules_nothing_fits_are_left_unpaired_and_the_conversion_stops():
    class Wide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 5)

    template = nnx.eval_shape(lambda: nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    suggestion = bridge.suggest_rules(Wide(), template=template)
    assert suggestion.pairings == [] and suggestion.unpaired == ["source a", "template (root)"]
    with pytest.raises(bridge.MismatchError, match="missing"):
        bridge.convert(Wide(), to="nnx", template=template, rules="auto")


def test_auto_rules_need_a_template():
    with pytest.raises(TypeError, match="template"):
        bridge.convert(TorchTwins(), to="nnx_state", rules="auto")


def test_a_fused_projection_whose_axis_nothing_tells_is_a_tie():
    """BERT's q/k/v into one `qkv` kernel from a bare state_dict: (out, in) weights
    concatenated on axis 0, or (in, out) on axis 1, both fit; the module kind decides."""
    state = ported_models.torch_model("bert").state_dict()  # no module types
    template = ported_models.template("bert")
    suggestion = bridge.suggest_rules(state, template=template)
    (tie,) = suggestion.ties
    assert tie.targets == ("encoder.{i}.attn.qkv",) and len(tie.sources) == 3
    assert "axes [0, 1]" in str(tie) and "modules=" in str(tie)
    given = {"(query|key|value)$": "Linear"}
    assert bridge.suggest_rules(state, template=template, modules=given).ok


@pytest.mark.parametrize("name", ["gpt2", "bert", "cnn"])
def test_auto_rules_export_the_port_back_to_the_torch_model_bit_exact(name):
    """The other way (Merge for GPT-2's c_attn, Split for BERT's q/k/v): the state_dict
    that comes back holds the torch model's bytes."""
    torch_model = ported_models.torch_model(name)
    model = bridge.convert(
        torch_model, to="nnx", template=ported_models.template(name), rules="auto"
    )
    blank = ported_models.torch_model(name)
    with torch.no_grad():
        for value in blank.parameters():
            value.zero_()
    state = bridge.convert(model, to="torch", template=blank, rules="auto")
    expected = torch_model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert np.asarray(state[key]).tobytes() == value.numpy().tobytes(), key


def test_shapes_never_override_names_that_do_not_fit():
    """`a` and `b` on both sides, their shapes swapped: a swap would fit, names say no."""

    class Source(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    class Target(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.a, self.b = nnx.Linear(8, 4, rngs=rngs), nnx.Linear(4, 8, rngs=rngs)

    template = nnx.eval_shape(lambda: Target(nnx.Rngs(0)))
    suggestion = bridge.suggest_rules(Source(), template=template)
    assert suggestion.pairings == [] and suggestion.rules == []
    assert suggestion.unpaired == [
        "source a, template a: paired by name, do not fit",
        "source b, template b: paired by name, do not fit",
    ]
    with pytest.raises(bridge.MismatchError, match="mismatch"):
        bridge.convert(Source(), to="nnx", template=template, rules="auto")


# --- scanned sources, exported to per-layer keys; Linen-named blocks -------------------------


def _blank(name: str) -> torch.nn.Module:
    """The torch model with every parameter zero: a template whose values are no answer."""
    model = ported_models.torch_model(name)
    with torch.no_grad():
        for value in model.parameters():
            value.zero_()
    return model


def _same_bytes(state, expected: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert np.asarray(state[key]).tobytes() == value.numpy().tobytes(), key


def test_a_scanned_port_exports_to_torch_by_renaming_then_unstacking_its_layers(tmp_path):
    """The Llama port's layers are one stacked block; torch's are `model.layers.{i}`:
    the suggestion renames the stacked keys into torch's names, then unstacks them
    (the inverse of the Stack it suggests for the load)."""
    torch_model = ported_models.torch_model("llama")
    template = ported_models.template("llama")
    model = bridge.convert(torch_model, to="nnx", template=template, rules="auto")
    blank = _blank("llama")
    suggestion = bridge.suggest_rules(model, template=blank)
    print(f"\nllama export from scanned: leaf pairs by evidence {suggestion.counts()}")
    assert suggestion.ok and not suggestion.unpaired, str(suggestion)
    unstacks = [rule for rule in suggestion.rules if isinstance(rule, bridge.Unstack)]
    assert unstacks == [bridge.Unstack("model.layers.{rest*}", "model.layers.{i}.{rest*}")]
    assert ("layers.attention.wq", "model.layers.{i}.self_attn.q_proj") in {
        (p.sources[0], p.targets[0]) for p in suggestion.pairings if p.layers == 2
    }

    state = bridge.convert(model, to="torch", template=blank, rules="auto")
    _same_bytes(state, torch_model.state_dict())
    blank.load_state_dict(state, strict=True)
    for got, expected in zip(
        torch_outputs("llama", blank), nnx_outputs("llama", model), strict=True
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)

    checkpoint = tmp_path / "ckpt"
    bridge.save(model, checkpoint, format="orbax")
    factory = f"{ported_models.__file__}:llama_torch_model"
    args = ["plan", str(checkpoint), "--to", "torch", "--template", factory]
    toml = str(tmp_path / "rules.toml")
    done = CliRunner().invoke(app, [*args, "--suggest-rules", toml])
    assert done.exit_code == 0, done.output
    rules, modules = load_rules(toml)
    assert rules == bridge.suggest_rules(str(checkpoint), template=blank).rules
    assert rules == suggestion.rules and not modules
    _same_bytes(bridge.convert(model, to="torch", template=blank, rules=rules), state)
    done = CliRunner().invoke(app, [*args, "--rules", toml])
    assert done.exit_code == 0, done.output


class ScannedTwins(nnx.Module):
    """Two blocks stacked (`nnx.vmap`), each of two Linear layers of one shape, or of a
    fused `qkv` (4 -> 12)."""

    def __init__(self, fused: bool, rngs: nnx.Rngs) -> None:
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def layers(rngs: nnx.Rngs) -> nnx.Module:
            return nnx.Dict(qkv=nnx.Linear(4, 12, rngs=rngs)) if fused else NnxTwins(rngs)

        self.layers = layers(rngs)


class TorchQkv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(4, 4) for _ in range(3))


def test_a_scanned_source_whose_stacked_twins_fit_both_ways_is_a_tie():
    """`layers.left` and `layers.right` (stacked) against `blocks.{i}.a` and `.b`: the
    blocks align, their modules do not; the tie is named, nothing is exported."""
    model = ScannedTwins(fused=False, rngs=nnx.Rngs(0))
    template = torch.nn.Module()
    template.blocks = torch.nn.ModuleList([TorchTwins(), TorchTwins()])
    suggestion = bridge.suggest_rules(model, template=template)
    assert [(t.sources, t.targets) for t in suggestion.ties] == [
        (("layers.left", "layers.right"), ("blocks.{i}.a", "blocks.{i}.b"))
    ]
    with pytest.raises(bridge.MismatchError, match=r"layers.left, layers.right.*tie"):
        bridge.convert(model, to="torch", template=template, rules="auto")


def test_two_scanned_stacks_that_fit_two_block_lists_alike_are_a_tie():
    """`first` and `second` (each two stacked layers of `left`/`right`) against torch's
    `blocks.{i}` and `others.{i}` of the same modules: which stack is which list, no
    evidence says; both ties are named and nothing is exported."""

    class Source(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.first = ScannedTwins(fused=False, rngs=rngs).layers
            self.second = ScannedTwins(fused=False, rngs=rngs).layers

    template = torch.nn.Module()
    template.blocks = torch.nn.ModuleList([TorchTwins(), TorchTwins()])
    template.others = torch.nn.ModuleList([TorchTwins(), TorchTwins()])
    model = Source(nnx.Rngs(0))
    suggestion = bridge.suggest_rules(model, template=template)
    assert sorted((t.sources, t.targets) for t in suggestion.ties) == [
        (("first",), ("blocks.{i}", "others.{i}")),
        (("second",), ("blocks.{i}", "others.{i}")),
    ]
    with pytest.raises(bridge.MismatchError, match=r"first.*tie: first <-> blocks\.\{i\}"):
        bridge.convert(model, to="torch", template=template, rules="auto")


def test_a_subtree_that_only_looks_stacked_is_not_aligned_with_the_blocks():
    """`extra.a` and `extra.b` (Linear 2 -> 2: every leading axis 2, as many as the
    layers, and more modules than the real block) hold other elements a layer than
    torch's blocks: not a scanned block; the real one is."""

    class Source(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def layers(rngs: nnx.Rngs) -> nnx.Module:
                return nnx.Dict(lin=nnx.Linear(4, 4, rngs=rngs))

            self.layers = layers(rngs)
            self.extra = nnx.Dict(a=nnx.Linear(2, 2, rngs=rngs), b=nnx.Linear(2, 2, rngs=rngs))

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

    template = torch.nn.Module()
    template.blocks = torch.nn.ModuleList([Block(), Block()])
    template.extra = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    model = Source(nnx.Rngs(0))
    suggestion = bridge.suggest_rules(model, template=template)
    assert suggestion.ok and not suggestion.unpaired, str(suggestion)
    state = bridge.convert(model, to="torch", template=template, rules="auto")
    kernel = np.asarray(model.layers["lin"].kernel.get_value())
    assert np.asarray(state["blocks.1.lin.weight"]).tobytes() == kernel[1].T.tobytes()
    expected = np.asarray(model.extra["b"].kernel.get_value()).T.tobytes()
    assert np.asarray(state["extra.b.weight"]).tobytes() == expected


def test_a_stacked_fused_projection_splits_along_its_axis_after_the_layer_axis():
    """A stacked `qkv` kernel (layers, in, 3 * out) into per-layer torch q, k, v: the
    split axis counts the layer axis first."""
    model = ScannedTwins(fused=True, rngs=nnx.Rngs(0))
    template = torch.nn.Module()
    template.blocks = torch.nn.ModuleList([TorchQkv(), TorchQkv()])
    suggestion = bridge.suggest_rules(model, template=template)
    assert suggestion.ok and not suggestion.unpaired, str(suggestion)
    assert (
        bridge.Split(
            "layers.qkv.kernel", ["blocks.q.kernel", "blocks.k.kernel", "blocks.v.kernel"], 2
        )
        in suggestion.rules
    )
    state = bridge.convert(model, to="torch", template=template, rules="auto")
    kernel = np.asarray(model.layers["qkv"].kernel.get_value())
    bias = np.asarray(model.layers["qkv"].bias.get_value())
    for layer in range(2):
        for part, name in enumerate("qkv"):
            columns = slice(4 * part, 4 * part + 4)
            weight = np.ascontiguousarray(kernel[layer][:, columns].T)
            assert np.asarray(state[f"blocks.{layer}.{name}.weight"]).tobytes() == weight.tobytes()
            got = np.asarray(state[f"blocks.{layer}.{name}.bias"]).tobytes()
            assert got == bias[layer][columns].tobytes()


def test_linen_named_blocks_load_through_auto_rules_and_export_back_bit_exact():
    """A Linen Llama whose blocks Linen named `layers_0`, `layers_1` (a list made in a
    loop) is a repeated block like `model.layers.{i}`: it loads from torch with outputs
    matching, and goes back to the torch model's bytes."""
    torch_model = ported_models.torch_model("llama")
    variables = ported_models.linen_llama_variables()
    suggestion = bridge.suggest_rules(torch_model, template=variables)
    print(f"\nlinen llama: leaf pairs by evidence {suggestion.counts()}")
    assert suggestion.ok and not suggestion.unpaired, str(suggestion)
    assert "tree" in suggestion.counts()
    assert ("model.layers.{i}.self_attn.q_proj", "layers_{i}.attn.query") in {
        (p.sources[0], p.targets[0]) for p in suggestion.pairings if p.layers == 2
    }

    loaded = bridge.convert(torch_model, to="linen", template=variables, rules="auto")
    ids = _inputs("llama")["input_ids"]
    got = ported_models.LinenLlama(ported_models.CONFIGS["llama"]).apply(loaded, ids)
    (expected,) = torch_outputs("llama", torch_model)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=2e-5)

    blank = _blank("llama")
    back = bridge.suggest_rules(loaded, template=blank)
    assert ("layers_{i}.attn.query", "model.layers.{i}.self_attn.q_proj") in {
        (p.sources[0], p.targets[0]) for p in back.pairings if p.layers == 2
    }
    state = bridge.convert(loaded, to="torch", template=blank, rules="auto")
    _same_bytes(state, torch_model.state_dict())
