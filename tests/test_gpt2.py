"""GPT-2 (HF Conv1D layers, tied head) <-> an NNX GPT-2 with HF's names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import bridge

CONV1D = {r"\.(c_attn|c_proj|c_fc)$": "Conv1D"}


class Attention(nnx.Module):
    def __init__(self, config: transformers.GPT2Config, rngs: nnx.Rngs) -> None:
        width = config.n_embd
        self.heads = config.n_head
        self.c_attn = nnx.Linear(width, 3 * width, rngs=rngs)
        self.c_proj = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        split = lambda t: t.reshape(batch, length, self.heads, -1)  # noqa: E731
        mask = nnx.make_causal_mask(jnp.ones((batch, length)))
        y = nnx.dot_product_attention(split(q), split(k), split(v), mask=mask)
        return self.c_proj(y.reshape(batch, length, width))


class Mlp(nnx.Module):
    def __init__(self, config: transformers.GPT2Config, rngs: nnx.Rngs) -> None:
        self.c_fc = nnx.Linear(config.n_embd, 4 * config.n_embd, rngs=rngs)
        self.c_proj = nnx.Linear(4 * config.n_embd, config.n_embd, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    def __init__(self, config: transformers.GPT2Config, rngs: nnx.Rngs) -> None:
        eps = config.layer_norm_epsilon
        self.ln_1 = nnx.LayerNorm(config.n_embd, epsilon=eps, rngs=rngs)
        self.attn = Attention(config, rngs)
        self.ln_2 = nnx.LayerNorm(config.n_embd, epsilon=eps, rngs=rngs)
        self.mlp = Mlp(config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
    def __init__(self, config: transformers.GPT2Config, rngs: nnx.Rngs) -> None:
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, rngs=rngs)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd, rngs=rngs)
        self.h = nnx.List([Block(config, rngs) for _ in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon, rngs=rngs)


class Gpt2LMHead(nnx.Module):
    """GPT-2 with the head tied to the token embedding, as HF's GPT2LMHeadModel."""

    def __init__(self, config: transformers.GPT2Config, rngs: nnx.Rngs) -> None:
        self.transformer = Transformer(config, rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        t = self.transformer
        x = t.wte(ids) + t.wpe(jnp.arange(ids.shape[1]))
        for block in t.h:
            x = block(x)
        return t.wte.attend(t.ln_f(x))


CONFIG = transformers.GPT2Config(
    n_layer=2,
    n_embd=32,
    n_head=4,
    vocab_size=97,
    n_positions=16,
    bos_token_id=0,
    eos_token_id=0,
)
IDS = np.array([[5, 17, 3, 88, 42, 9, 61], [1, 2, 3, 4, 5, 6, 7]])


@pytest.fixture(scope="module")
def hf_model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(CONFIG).eval()


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
    model = bridge.convert(state, to="nnx", template=template(), modules=CONV1D)
    check_parity(model, hf_model)


def test_export_round_trip_is_bit_exact(hf_model):
    model = bridge.convert(hf_model, to="nnx", template=template())
    state = bridge.convert(model, to="torch", template=hf_model)
    original = hf_model.state_dict()
    assert set(state) == set(original)
    for key, tensor in original.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    assert state["lm_head.weight"] is state["transformer.wte.weight"]  # still tied
    fresh = transformers.GPT2LMHeadModel(CONFIG)
    fresh.load_state_dict(state, strict=True)
