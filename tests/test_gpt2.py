"""GPT-2 (HF Conv1D layers, tied head) <-> an NNX GPT-2 with HF's names."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_state_dicts_equal
from flax import nnx
from nnx_gpt2 import CONV1D_MODULES, Gpt2LMHead, tiny_hf_gpt2

import bridge

CONFIG = tiny_hf_gpt2().config
IDS = np.array([[5, 17, 3, 88, 42, 9, 61], [1, 2, 3, 4, 5, 6, 7]])


@pytest.fixture(scope="module")
def hf_model() -> transformers.GPT2LMHeadModel:
    return tiny_hf_gpt2()


def hf_logits(model: transformers.GPT2LMHeadModel) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def template() -> Gpt2LMHead:
    return nnx.eval_shape(lambda: Gpt2LMHead(CONFIG, nnx.Rngs(0)))


def check_parity(model: Gpt2LMHead, hf_model) -> float:
    error = float(np.abs(np.asarray(model(jnp.asarray(IDS))) - hf_logits(hf_model)).max())
    print(f"GPT-2 max |logits error| = {error:.2e}")
    assert error < 1e-5
    return error


def test_from_the_module(hf_model):
    model = bridge.convert(hf_model, to="nnx", template=template())
    check_parity(model, hf_model)
    plan = bridge.plan(hf_model, to="nnx", template=template())
    rows = {row.target: row for row in plan.rows}
    assert rows["transformer.h.0.attn.c_attn.kernel"].transform == ""  # Conv1D: no transpose
    assert any("lm_head.weight: tied to transformer.wte.weight" in n for n in plan.report.notes)
    assert plan.report.unexpected == []


def test_from_the_state_dict_needs_to_be_told_about_conv1d(hf_model):
    state = hf_model.state_dict()
    with pytest.raises(bridge.MismatchError, match=r"(?s)attn\.c_proj\.weight.*square"):
        bridge.convert(state, to="nnx", template=template())
    model = bridge.convert(state, to="nnx", template=template(), modules=CONV1D_MODULES)
    check_parity(model, hf_model)


def test_export_round_trip_is_bit_exact(hf_model):
    model = bridge.convert(hf_model, to="nnx", template=template())
    state = bridge.convert(model, to="torch", template=hf_model)
    assert_state_dicts_equal(state, hf_model.state_dict())
    assert state["lm_head.weight"] is state["transformer.wte.weight"]  # still tied
    fresh = transformers.GPT2LMHeadModel(CONFIG)
    fresh.load_state_dict(state, strict=True)


def test_from_saved_safetensors(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    assert bridge.detect(tmp_path) == "safetensors"
    model = bridge.convert(tmp_path, to="nnx", template=template(), modules=CONV1D_MODULES)
    check_parity(model, hf_model)


@pytest.mark.parametrize("torch_template", [False, True], ids=["modules-hint", "meta-template"])
def test_export_to_safetensors_loads_in_transformers(hf_model, tmp_path, torch_template):
    model = bridge.convert(hf_model, to="nnx", template=template())
    if torch_template:  # an HF model on the meta device: names, shapes and module types only
        with torch.device("meta"):
            options = {"template": transformers.GPT2LMHeadModel(CONFIG)}
    else:
        options = {"modules": CONV1D_MODULES}
    out = bridge.save(model, tmp_path / "export", format="safetensors", **options)
    CONFIG.save_pretrained(out)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(reloaded), hf_logits(hf_model))
    with pytest.raises(bridge.OutputExistsError):
        bridge.save(model, out, format="safetensors", **options)
