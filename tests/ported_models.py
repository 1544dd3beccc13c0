"""NNX ports whose names are not the checkpoints': what `rules="auto"` must pair.

Each is written the way public JAX ports name things, not as a mirror of the torch
model: a GPT-2 with separate `attn.query/key/value/out`, `ln1`, `mlp.fc1`; a Llama in
Meta's naming (`attention.wq`, `feed_forward.w1`, `tok_embeddings`, `output`) with its
layers stacked by `nnx.vmap` and run by `nnx.scan`; a BERT with a fused `attn.qkv`; a
CNN whose layers are `nnx.List`s. float32, inference only. The torch models they load
come from `transformers` configs (and one `torch.nn` CNN) in `torch_models`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch
import transformers
from flax import nnx
from nnx_gpt2 import tiny_hf_gpt2

from tests.nnx_models import HF_CONFIGS, rotary_cos_sin, rotate_half


def _heads(x: jax.Array, heads: int) -> jax.Array:
    batch, length, _ = x.shape
    return x.reshape(batch, length, heads, -1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Softmax attention over (batch, length, heads, dim); `bias` is added to scores."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5 + bias
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(*out.shape[:2], -1)


def _causal(length: int) -> jax.Array:
    keep = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)


# --- GPT-2: separate q/k/v/out, ln1/ln2, mlp.fc1/fc2 ------------------------------------


class GptBlock(nnx.Module):
    def __init__(self, width: int, heads: int, eps: float, rngs: nnx.Rngs) -> None:
        self.heads = heads
        self.ln1 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
        self.attn = nnx.Dict(
            query=nnx.Linear(width, width, rngs=rngs),
            key=nnx.Linear(width, width, rngs=rngs),
            value=nnx.Linear(width, width, rngs=rngs),
            out=nnx.Linear(width, width, rngs=rngs),
        )
        self.ln2 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
        self.mlp = nnx.Dict(
            fc1=nnx.Linear(width, 4 * width, rngs=rngs), fc2=nnx.Linear(4 * width, width, rngs=rngs)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h, attn = self.ln1(x), self.attn
        q, k, v = (_heads(attn[name](h), self.heads) for name in ("query", "key", "value"))
        x = x + attn["out"](_attend(q, k, v, _causal(x.shape[1])))
        return x + self.mlp["fc2"](jax.nn.gelu(self.mlp["fc1"](self.ln2(x)), approximate=True))


class GptPort(nnx.Module):
    """GPT-2, the head tied to the token embedding."""

    def __init__(self, config: transformers.GPT2Config, rngs: nnx.Rngs) -> None:
        width, eps = config.n_embd, config.layer_norm_epsilon
        self.embed = nnx.Embed(config.vocab_size, width, rngs=rngs)
        self.pos_embed = nnx.Embed(config.n_positions, width, rngs=rngs)
        self.blocks = nnx.List(
            [GptBlock(width, config.n_head, eps, rngs) for _ in range(config.n_layer)]
        )
        self.final_norm = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids) + self.pos_embed(jnp.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.final_norm(x))


# --- Llama, Meta's names, scanned layers ---------------------------------------------


class MetaAttention(nnx.Module):
    def __init__(self, config: transformers.LlamaConfig, rngs: nnx.Rngs) -> None:
        width = config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = width // self.heads
        self.wq = nnx.Linear(width, self.heads * head_dim, use_bias=False, rngs=rngs)
        self.wk = nnx.Linear(width, self.kv_heads * head_dim, use_bias=False, rngs=rngs)
        self.wv = nnx.Linear(width, self.kv_heads * head_dim, use_bias=False, rngs=rngs)
        self.wo = nnx.Linear(self.heads * head_dim, width, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        q, k, v = _heads(self.wq(x), self.heads), _heads(self.wk(x), self.kv_heads), None
        v = _heads(self.wv(x), self.kv_heads)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return self.wo(_attend(q, k, v, _causal(x.shape[1])))


class MetaBlock(nnx.Module):
    def __init__(self, config: transformers.LlamaConfig, rngs: nnx.Rngs) -> None:
        width, inner, eps = config.hidden_size, config.intermediate_size, config.rms_norm_eps
        self.attention = MetaAttention(config, rngs)
        self.feed_forward = nnx.Dict(
            w1=nnx.Linear(width, inner, use_bias=False, rngs=rngs),
            w2=nnx.Linear(inner, width, use_bias=False, rngs=rngs),
            w3=nnx.Linear(width, inner, use_bias=False, rngs=rngs),
        )
        self.attention_norm = nnx.RMSNorm(width, epsilon=eps, rngs=rngs)
        self.ffn_norm = nnx.RMSNorm(width, epsilon=eps, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        ff, h = self.feed_forward, self.ffn_norm(x)
        return x + ff["w2"](nnx.silu(ff["w1"](h)) * ff["w3"](h))


class MetaLlama(nnx.Module):
    """Llama with its decoder layers stacked (`nnx.vmap`) and run by `nnx.scan`."""

    def __init__(self, config: transformers.LlamaConfig, rngs: nnx.Rngs) -> None:
        self.theta = float(config.rope_parameters["rope_theta"])
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.tok_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def layers(rngs: nnx.Rngs) -> MetaBlock:
            return MetaBlock(config, rngs)

        self.layers = layers(rngs)
        self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, rngs=rngs)
        self.output = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        cos, sin = rotary_cos_sin(ids.shape[1], self.head_dim, self.theta)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x: jax.Array, layer: MetaBlock) -> jax.Array:
            return layer(x, cos, sin)

        return self.output(self.norm(run(self.tok_embeddings(ids), self.layers)))


# --- Llama in Linen, its layers named by Linen (`layers_0`) -------------------------------


class LinenAttention(nn.Module):
    config: transformers.LlamaConfig

    def setup(self) -> None:
        config = self.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = config.hidden_size // self.heads
        self.query = nn.Dense(self.heads * head_dim, use_bias=False)
        self.key = nn.Dense(self.kv_heads * head_dim, use_bias=False)
        self.value = nn.Dense(self.kv_heads * head_dim, use_bias=False)
        self.out = nn.Dense(config.hidden_size, use_bias=False)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        q, k = _heads(self.query(x), self.heads), _heads(self.key(x), self.kv_heads)
        v = _heads(self.value(x), self.kv_heads)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return self.out(_attend(q, k, v, _causal(x.shape[1])))


class LinenMlp(nn.Module):
    config: transformers.LlamaConfig

    def setup(self) -> None:
        inner, width = self.config.intermediate_size, self.config.hidden_size
        self.gate, self.up = nn.Dense(inner, use_bias=False), nn.Dense(inner, use_bias=False)
        self.down = nn.Dense(width, use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nn.silu(self.gate(x)) * self.up(x))


class LinenBlock(nn.Module):
    config: transformers.LlamaConfig

    def setup(self) -> None:
        eps = self.config.rms_norm_eps
        self.norm1, self.norm2 = nn.RMSNorm(epsilon=eps), nn.RMSNorm(epsilon=eps)
        self.attn, self.mlp = LinenAttention(self.config), LinenMlp(self.config)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class LinenLlama(nn.Module):
    """Llama in Linen: its blocks a list made in a loop, which Linen names `layers_0`..."""

    config: transformers.LlamaConfig

    def setup(self) -> None:
        config = self.config
        self.embed = nn.Embed(config.vocab_size, config.hidden_size)
        self.layers = [LinenBlock(config) for _ in range(config.num_hidden_layers)]
        self.final_norm = nn.RMSNorm(epsilon=config.rms_norm_eps)
        self.head = nn.Dense(config.vocab_size, use_bias=False)

    def __call__(self, ids: jax.Array) -> jax.Array:
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        theta = float(self.config.rope_parameters["rope_theta"])
        cos, sin = rotary_cos_sin(ids.shape[1], head_dim, theta)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.final_norm(x))


def linen_llama_variables() -> dict:
    """The Linen Llama's variables from `init` (`{"params": ...}`), for `template=`."""
    ids = jnp.zeros((1, 4), dtype=jnp.int32)
    return LinenLlama(CONFIGS["llama"]).init(jax.random.key(0), ids)


# --- BERT, fused qkv ----------------------------------------------------------------------


def _layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=eps, use_fast_variance=False, rngs=rngs)


class BertBlock(nnx.Module):
    def __init__(self, config: transformers.BertConfig, rngs: nnx.Rngs) -> None:
        width, inner, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        self.heads = config.num_attention_heads
        self.attn = nnx.Dict(
            qkv=nnx.Linear(width, 3 * width, rngs=rngs), out=nnx.Linear(width, width, rngs=rngs)
        )
        self.attn_ln = _layer_norm(width, eps, rngs)
        self.mlp = nnx.Dict(
            fc1=nnx.Linear(width, inner, rngs=rngs), fc2=nnx.Linear(inner, width, rngs=rngs)
        )
        self.mlp_ln = _layer_norm(width, eps, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        q, k, v = (_heads(t, self.heads) for t in jnp.split(self.attn["qkv"](x), 3, axis=-1))
        x = self.attn_ln(x + self.attn["out"](_attend(q, k, v, bias)))
        h = self.mlp["fc2"](jax.nn.gelu(self.mlp["fc1"](x), approximate=False))
        return self.mlp_ln(x + h)


class BertPort(nnx.Module):
    """`(ids, token_types, mask) -> (hidden states, pooled)`; `mask` 1 keeps a token."""

    def __init__(self, config: transformers.BertConfig, rngs: nnx.Rngs) -> None:
        width = config.hidden_size
        self.embed = nnx.Dict(
            word=nnx.Embed(config.vocab_size, width, rngs=rngs),
            position=nnx.Embed(config.max_position_embeddings, width, rngs=rngs),
            token_type=nnx.Embed(config.type_vocab_size, width, rngs=rngs),
            norm=_layer_norm(width, config.layer_norm_eps, rngs),
        )
        self.encoder = nnx.List([BertBlock(config, rngs) for _ in range(config.num_hidden_layers)])
        self.pool = nnx.Linear(width, width, rngs=rngs)

    def __call__(
        self, ids: jax.Array, token_types: jax.Array, mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        e = self.embed
        x = e["word"](ids) + e["token_type"](token_types) + e["position"](jnp.arange(ids.shape[1]))
        x = e["norm"](x)
        bias = jnp.where(jnp.asarray(mask, bool), 0.0, jnp.finfo(jnp.float32).min)
        for block in self.encoder:
            x = block(x, bias[:, None, None, :])
        return x, jnp.tanh(self.pool(x[:, 0]))


# --- a CNN --------------------------------------------------------------------------------


class TorchCnn(torch.nn.Module):
    """Three 3x3 convolutions with batch norm, global average pool, two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv3, self.bn3 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = torch.relu(bn(conv(x)))
        return self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3)))))


class CnnPort(nnx.Module):
    """The CNN with its layers in lists, NHWC, batch statistics in inference mode."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        channels = [(3, 8), (8, 8), (8, 8)]
        self.convs = nnx.List(
            [nnx.Conv(i, o, (3, 3), padding="SAME", rngs=rngs) for i, o in channels]
        )
        self.norms = nnx.List(
            [nnx.BatchNorm(o, use_running_average=True, rngs=rngs) for _, o in channels]
        )
        self.classifier = nnx.Dict(
            hidden=nnx.Linear(8, 16, rngs=rngs), logits=nnx.Linear(16, 10, rngs=rngs)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.relu(norm(conv(x)))
        hidden = nnx.relu(self.classifier["hidden"](x.mean(axis=(1, 2))))
        return self.classifier["logits"](hidden)


# --- the torch models, from configs -----------------------------------------------------

CONFIGS = {"gpt2": tiny_hf_gpt2().config, **HF_CONFIGS}
TORCH_CLASSES = {
    "gpt2": transformers.GPT2LMHeadModel,
    "llama": transformers.LlamaForCausalLM,
    "bert": transformers.BertModel,
}
PORTS = {"gpt2": GptPort, "llama": MetaLlama, "bert": BertPort}
NAMES = ["gpt2", "llama", "bert", "cnn"]


def torch_model(name: str) -> torch.nn.Module:
    """A tiny torch model in eval mode, every parameter and statistic moved off its
    initial value so that no leaf is trivially right."""
    torch.manual_seed(0)
    model = TorchCnn() if name == "cnn" else TORCH_CLASSES[name](CONFIGS[name])
    with torch.no_grad():
        for value in [*model.parameters(), *model.buffers()]:
            if value.is_floating_point():
                value.add_(torch.rand_like(value) * 0.1)
    return model.eval()


def template(name: str) -> nnx.Module:
    """The abstract NNX port, for `template=`: built by `nnx.eval_shape`, no weights."""
    if name == "cnn":
        return nnx.eval_shape(lambda: CnnPort(nnx.Rngs(0)))
    return nnx.eval_shape(lambda: PORTS[name](CONFIGS[name], nnx.Rngs(0)))


gpt2_template, llama_template, bert_template, cnn_template = (
    functools.partial(template, name) for name in NAMES
)
"""`--template tests/ported_models.py:llama_template` for the CLI."""
llama_torch_model = functools.partial(torch_model, "llama")
"""`--template tests/ported_models.py:llama_torch_model`: the torch Llama, for exports."""
