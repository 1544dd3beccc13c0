"""Flax NNX twins of `transformers`' Llama and BERT, for parity tests.

The module trees mirror HF's attribute names exactly (`model.layers[0].self_attn.q_proj`,
`encoder.layer[0].attention.self.query`, `LayerNorm` ...), so that `bridge` matches every
torch key to an NNX path by name alone. float32, inference only: no dropout, no cache.
Both models are built from the HF config object itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

HF_CONFIGS = {
    "llama": transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=5000.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    ),
    "bert": transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        type_vocab_size=2,
        attn_implementation="eager",
    ),
}
"""Tiny configs of both, vocabulary 100, for tests that build them offline."""

# --- Llama ------------------------------------------------------------------------------


def rotary_cos_sin(positions: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """HF's default RoPE tables `(positions, head_dim)`: the inverse frequencies
    `1 / theta ** (arange(0, d, 2) / d)` in float32, repeated over both halves."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = np.arange(positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)
    emb = jnp.asarray(np.concatenate([freqs, freqs], axis=-1))
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    """HF's convention: `(x1, x2) -> (-x2, x1)` over the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


class LlamaAttention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        hidden, bias = config.hidden_size, config.attention_bias
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nnx.Linear(hidden, q_out, use_bias=bias, rngs=rngs)
        self.k_proj = nnx.Linear(hidden, kv_out, use_bias=bias, rngs=rngs)
        self.v_proj = nnx.Linear(hidden, kv_out, use_bias=bias, rngs=rngs)
        self.o_proj = nnx.Linear(q_out, hidden, use_bias=bias, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = self.num_heads // self.num_kv_heads  # HF's repeat_kv: kv head j serves
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # j*g .. j*g+g-1
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, -1)
        return self.o_proj(out)


class LlamaMLP(nnx.Module):
    """`down(silu(gate(x)) * up(x))`."""

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nnx.Linear(hidden, inner, use_bias=bias, rngs=rngs)
        self.up_proj = nnx.Linear(hidden, inner, use_bias=bias, rngs=rngs)
        self.down_proj = nnx.Linear(inner, hidden, use_bias=bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


def rms_norm(config, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """HF's LlamaRMSNorm: `weight * x * rsqrt(mean(x**2) + eps)`, statistics in float32."""
    return nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, rngs=rngs)


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then the gated MLP."""

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.mlp = LlamaMLP(config, rngs=rngs)
        self.input_layernorm = rms_norm(config, rngs)
        self.post_attention_layernorm = rms_norm(config, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    """Embedding, decoder layers, final norm: `input_ids -> last hidden state`."""

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.layers = nnx.List(
            [LlamaDecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.norm = rms_norm(config, rngs)
        heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.rope_theta = float(config.rope_parameters["rope_theta"])

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cos, sin = rotary_cos_sin(input_ids.shape[1], self.head_dim, self.rope_theta)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """`LlamaModel` and an untied `lm_head`: `input_ids -> logits`."""

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        self.model = LlamaModel(config, rngs=rngs)
        self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.lm_head(self.model(input_ids))


# --- BERT -------------------------------------------------------------------------------


def layer_norm(config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch's LayerNorm: two-pass variance, HF's `layer_norm_eps`."""
    return nnx.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs
    )


class BertEmbeddings(nnx.Module):
    """Word + token type + absolute position embeddings, then LayerNorm."""

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        hidden = config.hidden_size
        self.word_embeddings = nnx.Embed(config.vocab_size, hidden, rngs=rngs)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, hidden, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, hidden, rngs=rngs)
        self.LayerNorm = layer_norm(config, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertSelfAttention(nnx.Module):
    """Multi-head attention; `mask` is additive, `(batch, 1, 1, keys)`."""

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.query = nnx.Linear(hidden, hidden, rngs=rngs)
        self.key = nnx.Linear(hidden, hidden, rngs=rngs)
        self.value = nnx.Linear(hidden, hidden, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, length, _ = x.shape
        q, k, v = (
            proj(x).reshape(batch, length, self.num_heads, self.head_dim)
            for proj in (self.query, self.key, self.value)
        )
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5
        if mask is not None:
            scores = scores + mask
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, -1)


class BertSelfOutput(nnx.Module):
    """`LayerNorm(dense(x) + residual)`; also the shape of `BertOutput`."""

    def __init__(self, config, inner: int, *, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(inner, config.hidden_size, rngs=rngs)
        self.LayerNorm = layer_norm(config, rngs)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        self.self = BertSelfAttention(config, rngs=rngs)
        self.output = BertSelfOutput(config, config.hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nnx.Module):
    """`gelu(dense(x))`, the exact (erf) GELU of HF's "gelu"."""

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.dense(x), approximate=False)


class BertLayer(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        self.attention = BertAttention(config, rngs=rngs)
        self.intermediate = BertIntermediate(config, rngs=rngs)
        self.output = BertSelfOutput(config, config.intermediate_size, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        self.layer = nnx.List(
            [BertLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nnx.Module):
    """`tanh(dense(hidden state of the first token))`."""

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(config.hidden_size, config.hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(x[:, 0]))


class BertModel(nnx.Module):
    """`(input_ids, token_type_ids, attention_mask) -> (last_hidden_state, pooler_output)`.

    `attention_mask` is HF's: 1 for tokens to attend to, 0 for padding; padded keys get
    the most negative float added to their scores, as HF's eager attention does.
    """

    def __init__(self, config, *, rngs: nnx.Rngs) -> None:
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = BertPooler(config, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = None
        if attention_mask is not None:
            keep = jnp.asarray(attention_mask, bool)[:, None, None, :]
            mask = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        x = self.encoder(self.embeddings(input_ids, token_type_ids), mask)
        return x, self.pooler(x)
