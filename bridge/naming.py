"""What a module's own name says it does: name fragments -> roles (`wq` and `q_proj` are
both the query projection), for `rules="auto"` (bridge.suggest)."""

from __future__ import annotations

from bridge.tree import Path, index_of

COUNTER = "num_batches_tracked"
"""torch's BatchNorm counter: no Flax partner, it goes along with its module."""

_VOCABULARY = {
    "q": "q query wq q_proj to_q q_lin query_proj",
    "k": "k key wk k_proj to_k k_lin key_proj",
    "v": "v value wv v_proj to_v v_lin value_proj",
    "o": "o out wo o_proj out_proj to_out out_lin attn_out output_proj",
    "qkv": "qkv c_attn in_proj qkv_proj wqkv query_key_value attn_qkv",
    "gate_up": "gate_up gate_up_proj w13",
    "gate": "gate gate_proj w1 wi_0",
    "up": "up up_proj w3 wi_1",
    "down": "down down_proj w2",
    "fc1": "fc1 fc_1 c_fc fc_in lin1 wi dense_h_to_4h",
    "fc2": "fc2 fc_2 fc_out lin2 dense_4h_to_h",
    "norm_attn": "ln_1 ln1 norm1 input_layernorm attention_norm attn_norm ln_attn attn_ln "
    "pre_attention_norm attention_layernorm",
    "norm_mlp": "ln_2 ln2 norm2 post_attention_layernorm ffn_norm mlp_norm ln_mlp mlp_ln ffn_ln",
    "norm_f": "ln_f norm_f final_norm final_layernorm final_layer_norm norm_out",
    "embed": "wte embed embed_tokens tok_embeddings word_embeddings token_embedding tok_emb "
    "embedder token_embeddings embed_in word",
    "pos": "wpe position_embeddings pos_embed pos_emb position_embedding position pos",
    "type": "token_type_embeddings type_embed segment_embeddings token_type segment",
    "head": "lm_head head unembed output",
}
TAGS = {word: tag for tag, words in _VOCABULARY.items() for word in words.split()}
"""Name fragment -> role: what a module's own name says it does."""
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
"""Fused roles and their parts, in the order the fused name spells them."""
_ATTENTION = {"attention", "attn", "self_attn", "self_attention", "mha"}
_MLP = {"mlp", "ffn", "feed_forward", "feedforward", "ff"}
_NORMS = {"ln", "norm", "layernorm", "layer_norm", "rmsnorm"}
_DENSE = {"dense", "proj", "linear", "c_proj"}


def tag(rel: Path) -> str | None:
    """The role a module's name spells: its own name's, or a generic name's (`dense`,
    `LayerNorm`) read in its context (`attention.output.dense` is the output projection)."""
    parts = [str(part).lower() for part in rel if index_of(part) is None]
    if not parts:
        return None
    last, context = parts[-1], set(parts[:-1])
    if last in TAGS:
        return TAGS[last]
    if last in _NORMS:
        return "norm_attn" if context & _ATTENTION else "norm_mlp" if context & _MLP else None
    if last in _DENSE and context & _ATTENTION:
        return "o"
    if last in _DENSE and "intermediate" in context:
        return "fc1"
    return None
