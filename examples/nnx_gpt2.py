"""A GPT-2 in Flax NNX whose attribute names follow HF's `GPT2LMHeadModel`, so that
`bridge` matches its weights by name, with no key table. The head is tied to the token
embedding, as in HF. `tiny_hf_gpt2` builds the HF model the recipes convert, offline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
import transformers
from flax import nnx

CONV1D_MODULES = {r"\.(c_attn|c_proj|c_fc)$": "Conv1D"}
"""For `bridge.convert(..., modules=CONV1D_MODULES)`: HF's GPT-2 state_dict does not say
that these layers are `Conv1D`s, which store weights (in, out), not (out, in)."""


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


def tiny_hf_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A small HF GPT-2 with random weights, built from a config: what the recipes use in
    place of a downloaded checkpoint, so that they run offline and in seconds."""
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=97,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()
