"""Acceptance against a peer: transformers 4.57's own PyTorch -> Flax converter.

transformers 4.57 is the last series with Flax models, and with them
`transformers.modeling_flax_pytorch_utils.convert_pytorch_state_dict_to_flax`, the
converter `from_pretrained(..., from_pt=True)` runs. For twelve architectures at tiny
random configs, `bridge.convert(torch_model, to="linen", template=flax_model.params)`
must give that converter's arrays bit for bit (dtype, shape, bytes), over exactly the
leaves of the Flax model's params tree, with no rules (Wav2Vec2's weight-norm names
aside, see `WEIGHT_NORM`), and the Flax model run on bridge's params must give torch's
outputs.

The harness is checked on its own (`test_reference_reproduces_torch`): the reference's
params make each Flax model match torch, so a failure of the bridge tests is bridge's.

What `bridge.convert(..., to="linen", template=flax_model.params)` returns: the template
is the bare params tree of a transformers Flax model (`{"embeddings": ..., "encoder":
...}`, no collection level), and the result is Linen variables, collection-first:
`{"params": <a tree shaped like the template>}`. The tests compare its `"params"` subtree
and require that there is nothing else. The reference also returns what it could not
place (BART: `encoder/embed_tokens/kernel` and `decoder/embed_tokens/kernel`, torch's
copies of the shared embedding, transposed): only the leaves of the Flax params tree are
compared, and bridge must report none of torch's keys as left over (tied weights are not).

Runs only in its own environment (`make test-hf4`, `.venv-hf4`: transformers 4.57.3,
flax 0.12.8); the main run deselects the `hf4` marker (pyproject's addopts), so it is
neither a failure nor a skip there. Flax T5 is not among the twelve: it calls
`jnp.clip(a_max=)`, which jax 0.10 refuses (TypeError).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict

import bridge

pytestmark = pytest.mark.hf4

RTOL, ATOL = 1e-4, 1e-5
BATCH, LENGTH, VOCAB = 2, 7, 99
TEXT = dict(  # the tiny sizes of the configs that spell them the BERT way
    vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2
)

# Wav2Vec2's positional convolution is weight-normalised: torch (`parametrizations.
# weight_norm`) stores the magnitude and direction as `conv.parametrizations.weight.
# original0` / `original1`; Flax's FlaxConvWithWeightNorm holds them as `conv.weight_g` /
# `conv.weight_v`, both in torch's layout. No module type or role says that `original0`
# is a `g` and `original1` a `v` (the names are torch's parametrization API, not a
# tensor layout), so this is a rename the caller gives: one rule, one pattern per name.
WEIGHT_NORM = [
    (r"\.parametrizations\.weight\.original0$", ".weight_g"),
    (r"\.parametrizations\.weight\.original1$", ".weight_v"),
]


def tokens(rng: np.random.Generator, length: int = LENGTH) -> np.ndarray:
    return rng.integers(3, VOCAB, size=(BATCH, length), dtype=np.int64)


def padded() -> np.ndarray:
    """An attention mask with the second row's last two positions padded."""
    mask = np.ones((BATCH, LENGTH), np.int64)
    mask[1, -2:] = 0
    return mask


def images(rng: np.random.Generator, size: int = 8) -> np.ndarray:
    """NCHW, as both the torch and the Flax models take pixel values."""
    return rng.standard_normal((BATCH, 3, size, size)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Case:
    config: Callable[[], Any]
    torch_class: str
    flax_class: str
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]
    outputs: tuple[str, ...]
    rules: tuple[tuple[str, str], ...] = ()


def _whisper_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Whisper's encoder takes exactly 2 * max_source_positions frames
    features = rng.standard_normal((BATCH, 8, 32)).astype(np.float32)
    return {"input_features": features, "decoder_input_ids": tokens(rng, 5)}


CASES: dict[str, Case] = {
    "bert": Case(
        lambda: transformers.BertConfig(
            **TEXT, num_attention_heads=4, max_position_embeddings=32, type_vocab_size=2
        ),
        "BertModel",
        "FlaxBertModel",
        lambda rng: {
            "input_ids": tokens(rng),
            "attention_mask": padded(),
            "token_type_ids": np.array([[0] * 4 + [1] * 3] * BATCH),
        },
        ("last_hidden_state", "pooler_output"),
    ),
    "roberta": Case(
        lambda: transformers.RobertaConfig(
            **TEXT, num_attention_heads=4, max_position_embeddings=32, pad_token_id=1
        ),
        "RobertaModel",
        "FlaxRobertaModel",
        lambda rng: {"input_ids": tokens(rng), "attention_mask": padded()},
        ("last_hidden_state", "pooler_output"),
    ),
    "gpt2": Case(
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=37
        ),
        "GPT2Model",
        "FlaxGPT2Model",
        lambda rng: {"input_ids": tokens(rng)},
        ("last_hidden_state",),
    ),
    "gpt_neo": Case(
        lambda: transformers.GPTNeoConfig(
            vocab_size=VOCAB,
            max_position_embeddings=32,
            hidden_size=32,
            num_layers=2,
            attention_types=[[["global", "local"], 1]],
            num_heads=4,
            intermediate_size=37,
            window_size=4,  # shorter than the input: the local layer's window matters
        ),
        "GPTNeoModel",
        "FlaxGPTNeoModel",
        lambda rng: {"input_ids": tokens(rng)},
        ("last_hidden_state",),
    ),
    "opt": Case(
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=37,
            num_attention_heads=4,
            max_position_embeddings=32,
            word_embed_proj_dim=32,
        ),
        "OPTModel",
        "FlaxOPTModel",
        lambda rng: {"input_ids": tokens(rng)},
        ("last_hidden_state",),
    ),
    "bart": Case(
        lambda: transformers.BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_position_embeddings=32,
        ),
        "BartModel",
        "FlaxBartModel",
        lambda rng: {
            "input_ids": tokens(rng),
            "attention_mask": padded(),
            "decoder_input_ids": tokens(rng, 5),
        },
        ("last_hidden_state", "encoder_last_hidden_state"),
    ),
    "vit": Case(
        lambda: transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        ),
        "ViTModel",
        "FlaxViTModel",
        lambda rng: {"pixel_values": images(rng)},
        ("last_hidden_state", "pooler_output"),
    ),
    "clip": Case(
        lambda: transformers.CLIPConfig(
            text_config={
                **TEXT,
                "num_attention_heads": 4,
                "max_position_embeddings": 16,
                # 2: torch pools at the largest token id, as Flax CLIP always does
                "eos_token_id": 2,
            },
            vision_config={
                "image_size": 8,
                "patch_size": 4,
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
            projection_dim=16,
        ),
        "CLIPModel",
        "FlaxCLIPModel",
        lambda rng: {"input_ids": tokens(rng), "pixel_values": images(rng)},
        ("text_embeds", "image_embeds", "logits_per_image"),
    ),
    "llama": Case(
        lambda: transformers.LlamaConfig(
            **TEXT,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            attn_implementation="eager",
        ),
        "LlamaModel",
        "FlaxLlamaModel",
        lambda rng: {"input_ids": tokens(rng)},
        ("last_hidden_state",),
    ),
    "mistral": Case(
        lambda: transformers.MistralConfig(
            **TEXT,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            # Flax Mistral's window admits one position more than torch's (`triu(k=-w)`
            # against torch's `i - j < w`): a window as long as the input keeps the two
            # models the same; bridge does not meet the window.
            sliding_window=LENGTH,
            attn_implementation="eager",
        ),
        "MistralModel",
        "FlaxMistralModel",
        lambda rng: {"input_ids": tokens(rng)},
        ("last_hidden_state",),
    ),
    "whisper": Case(
        lambda: transformers.WhisperConfig(
            vocab_size=VOCAB,
            num_mel_bins=8,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_source_positions=16,
            max_target_positions=16,
            pad_token_id=1,  # the defaults are token ids of the real vocabulary
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
        "WhisperModel",
        "FlaxWhisperModel",
        _whisper_inputs,
        ("last_hidden_state", "encoder_last_hidden_state"),
    ),
    "wav2vec2": Case(
        lambda: transformers.Wav2Vec2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            conv_dim=(16, 16),
            conv_stride=(4, 4),
            conv_kernel=(8, 8),
            num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=2,
            # Flax Wav2Vec2 has only the "stable layer norm" variant (large-lv60's)
            do_stable_layer_norm=True,
            feat_extract_norm="layer",
        ),
        "Wav2Vec2Model",
        "FlaxWav2Vec2Model",
        lambda rng: {"input_values": rng.standard_normal((BATCH, 400)).astype(np.float32)},
        ("last_hidden_state", "extract_features"),
        rules=tuple(WEIGHT_NORM),
    ),
}


@dataclasses.dataclass
class Built:
    torch_model: Any
    flax_model: Any
    forward: Callable[[Any], Any]
    """the Flax model on the inputs, as a function of its params (jitted: one compile
    for the three sets of params a test runs it on)"""
    expected: dict[str, np.ndarray]
    """torch's outputs, by name"""
    reference: dict[tuple[str, ...], np.ndarray]
    """the reference converter's arrays, flat, restricted to the Flax params tree"""


@functools.cache
def built(name: str) -> Built:
    """The torch model (eval mode, every parameter moved off its initial value, so that
    no norm scale is 1 and no bias 0 by chance), its Flax twin, torch's outputs and the
    reference conversion; once per architecture."""
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    case = CASES[name]
    config = case.config()
    torch.manual_seed(0)
    torch_model = getattr(transformers, case.torch_class)(config).eval()
    with torch.no_grad():
        for param in torch_model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    flax_model = getattr(transformers, case.flax_class)(config, seed=0)

    inputs = case.inputs(np.random.default_rng(0))
    with torch.no_grad():
        out = torch_model(**{key: torch.from_numpy(value) for key, value in inputs.items()})
    expected = {key: out[key].numpy() for key in case.outputs}

    # the reference converts numpy in place of the tensors of the dict it is given
    reference = convert_pytorch_state_dict_to_flax(torch_model.state_dict(), flax_model)
    reference = flatten_dict(reference)
    tree = flatten_dict(flax_model.params)
    assert set(tree) <= set(reference), f"the reference leaves {set(tree) - set(reference)} out"
    for key, leaf in tree.items():
        assert reference[key].shape == leaf.shape and reference[key].dtype == leaf.dtype, key
    reference = {key: np.asarray(reference[key]) for key in tree}
    forward = jax.jit(lambda params: flax_model(**inputs, params=params))
    return Built(torch_model, flax_model, forward, expected, reference)


def assert_outputs_match(name: str, params: Mapping[str, Any]) -> None:
    """The Flax model run on `params` gives torch's outputs, to float tolerance."""
    b = built(name)
    out = b.forward(params)
    for key, expected in b.expected.items():
        np.testing.assert_allclose(
            np.asarray(out[key]), expected, rtol=RTOL, atol=ATOL, err_msg=f"{name} {key}"
        )


@functools.cache
def converted(name: str) -> tuple[dict[tuple[str, ...], Any], Any]:
    """bridge's conversion: (flat `"params"` subtree, report). strict=False, so that a
    failure shows every leaf that differs; the report must still be clean (below)."""
    b = built(name)
    variables, report = bridge.convert(
        b.torch_model,
        to="linen",
        template=b.flax_model.params,
        rules=list(CASES[name].rules) or None,
        strict=False,
    )
    assert set(variables) == {"params"}, f"collections {sorted(variables)}: expected params"
    return flatten_dict(variables["params"]), report


@pytest.mark.parametrize("name", CASES)
def test_reference_reproduces_torch(name):
    """The harness: the reference converter's params make the Flax model match torch,
    and the Flax model's own random params do not (the comparison can fail)."""
    assert_outputs_match(name, unflatten_dict(built(name).reference))
    with pytest.raises(AssertionError):
        assert_outputs_match(name, built(name).flax_model.params)


@pytest.mark.parametrize("name", CASES)
def test_bridge_gives_the_reference_arrays(name):
    """Every leaf of the Flax params tree, bit for bit, and a clean report (what
    `strict=True`, the default, would require)."""
    reference = built(name).reference
    ours, report = converted(name)
    problems = [f"{'/'.join(key)}: not in the Flax params tree" for key in ours.keys() - reference]
    for key in sorted(reference):
        where = "/".join(key)
        if key not in ours:
            problems.append(f"{where}: not in bridge's output")
            continue
        a, b = np.asarray(ours[key]), reference[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{where}: bridge {a.dtype}{a.shape}, reference {b.dtype}{b.shape}")
        elif a.tobytes() != b.tobytes():
            problems.append(f"{where}: same dtype and shape {a.shape}, other values")
    assert not problems, (
        f"{len(problems)} of {len(reference)} leaves differ:\n"
        + "\n".join(problems)
        + f"\n\nbridge's report:\n{report}"
    )
    assert report.ok, str(report)


@pytest.mark.parametrize("name", CASES)
def test_bridge_params_reproduce_torch(name):
    ours, _ = converted(name)
    assert_outputs_match(name, unflatten_dict(ours))
