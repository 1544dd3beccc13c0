"""Parity on real `transformers` architectures: Llama (grouped-query attention, RoPE,
RMSNorm, untied head) and BERT (LayerNorm, token types, padding mask, pooler).

Each HF model is built offline from a tiny config with random weights, converted into
its NNX twin (tests/nnx_models.py) from the torch module, from its state_dict and from a
`save_pretrained` directory; the NNX outputs must match torch's, and the NNX model
exported back with the HF model as template must be the original state_dict bit for bit.
"""

from __future__ import annotations

import importlib
import time

import jax.numpy as jnp
import nnx_models
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_state_dicts_equal
from flax import nnx

import bridge

ATOL = 1e-5
BATCH, LENGTH, VOCAB = 2, 7, 100
SOURCES = ["module", "state_dict", "safetensors"]
ERRORS: dict[tuple[str, str, str], float] = {}
"""(model, source, output) -> max abs error, printed per test and summed up at the end."""


@pytest.fixture(scope="module", autouse=True)
def error_summary():
    """Prints every parity error measured in this module once its tests ran (`-s`)."""
    yield
    for (name, given, output), error in sorted(ERRORS.items()):
        print(f"\n  max abs error  {name:5} {given:11} {output:17} {error:.3e}", end="")


CONFIGS = nnx_models.HF_CONFIGS
HF_CLASSES = {"llama": transformers.LlamaForCausalLM, "bert": transformers.BertModel}
NNX_CLASSES = {"llama": nnx_models.LlamaForCausalLM, "bert": nnx_models.BertModel}


def make_hf_model(name: str) -> torch.nn.Module:
    """The HF model in eval mode, every parameter moved off its initial value (norm
    scales away from 1, biases away from 0) so that no leaf is trivially right."""
    torch.manual_seed(0)
    model = HF_CLASSES[name](CONFIGS[name]).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def inputs(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCAB, size=(BATCH, LENGTH))
    if name == "llama":
        return {"input_ids": ids}
    token_types = np.zeros((BATCH, LENGTH), np.int64)
    token_types[:, 4:] = 1
    mask = np.ones((BATCH, LENGTH), np.int64)
    mask[1, 5:] = 0  # the second sequence is padded
    return {"input_ids": ids, "token_type_ids": token_types, "attention_mask": mask}


def torch_outputs(name: str, model: torch.nn.Module) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(**{key: torch.from_numpy(value) for key, value in inputs(name).items()})
    if name == "llama":
        return {"logits": out.logits.numpy()}
    return {
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": out.pooler_output.numpy(),
    }


def nnx_outputs(name: str, model: nnx.Module) -> dict[str, np.ndarray]:
    args = {key: jnp.asarray(value) for key, value in inputs(name).items()}
    if name == "llama":
        return {"logits": np.asarray(model(args["input_ids"]))}
    hidden, pooled = model(args["input_ids"], args["token_type_ids"], args["attention_mask"])
    return {"last_hidden_state": np.asarray(hidden), "pooler_output": np.asarray(pooled)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf(request, tmp_path_factory):
    """(name, HF model, its outputs, a `save_pretrained` directory of it)."""
    name = request.param
    model = make_hf_model(name)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return name, model, torch_outputs(name, model), str(directory)


def source_of(given: str, model: torch.nn.Module, directory: str):
    if given == "module":
        return model
    if given == "state_dict":
        return model.state_dict()
    importlib.import_module("bridge.formats.safetensors")  # registers the format
    return directory


@pytest.mark.parametrize("given", SOURCES)
def test_hf_model_parity_in_nnx_and_bit_exact_export(hf, given):
    name, hf_model, expected, directory = hf
    config = CONFIGS[name]
    template = nnx.eval_shape(lambda: NNX_CLASSES[name](config, rngs=nnx.Rngs(0)))

    start = time.perf_counter()
    model = bridge.convert(source_of(given, hf_model, directory), to="nnx", template=template)
    seconds = time.perf_counter() - start
    got = nnx_outputs(name, model)
    for output, reference in expected.items():
        error = float(np.max(np.abs(got[output] - reference)))
        ERRORS[name, given, output] = error
        print(f"\n{name:5} from {given:11} {output:17} max abs error {error:.3e}", end="")
        np.testing.assert_allclose(got[output], reference, rtol=0, atol=ATOL, err_msg=output)
    print(f"  (convert {seconds * 1e3:.0f} ms)", end="")

    back = bridge.convert(model, to="torch", template=hf_model)
    assert_state_dicts_equal(back, hf_model.state_dict())
    fresh = HF_CLASSES[name](config)
    fresh.load_state_dict(back, strict=True)
    assert_state_dicts_equal(fresh.state_dict(), hf_model.state_dict())


def test_bert_padding_mask_is_exercised():
    """The padded tokens of the second sequence change nothing in its other positions,
    and without the mask those positions differ: the parity above did test masking."""
    hf_model = make_hf_model("bert")
    expected = torch_outputs("bert", hf_model)["last_hidden_state"][1, :5]
    template = nnx.eval_shape(lambda: nnx_models.BertModel(CONFIGS["bert"], rngs=nnx.Rngs(0)))
    model = bridge.convert(hf_model, to="nnx", template=template)
    args = {key: jnp.asarray(value) for key, value in inputs("bert").items()}
    ids = args["input_ids"].at[1, 5:].set((args["input_ids"][1, 5:] + 1) % VOCAB)
    hidden, _ = model(ids, args["token_type_ids"], args["attention_mask"])
    np.testing.assert_allclose(np.asarray(hidden)[1, :5], expected, rtol=0, atol=ATOL)
    unmasked, _ = model(ids, args["token_type_ids"])
    assert np.max(np.abs(np.asarray(unmasked)[1, :5] - expected)) > 1e-3
