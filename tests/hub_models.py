"""Tiny random transformers models whose in-memory layout differs from their Hub
checkpoints, built the same way by transformers 4.57 and 5.x, for tests/test_hub_layout.py.

Run as a script with transformers 5.x, it is the other side of the `hf4` tests, which
run in transformers 4.57's environment, one process for all models:

    python tests/hub_models.py export <directory>   # bridge's exports: <directory>/<model>
    python tests/hub_models.py load <directory>     # bridge's loads of <directory>/<model>

`export` writes bridge.save's directory (with a meta template) of each model of `SEED`;
`load` reads each Hub directory into a transformers 5 template with bridge and prints,
as JSON by model, the report and the tensors that differ from what transformers 5's own
`from_pretrained` loads from that directory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as T

SEED = 0
VOCAB = 64


def gpt2() -> Any:
    return T.GPT2LMHeadModel(
        T.GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=1,
        )
    )


def gpt_neox() -> Any:
    return T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
        )
    )


def vit() -> Any:
    return T.ViTForImageClassification(
        T.ViTConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
            num_labels=3,
        )
    )


def mixtral() -> Any:
    return T.MixtralForCausalLM(
        T.MixtralConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            vocab_size=VOCAB,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=32,
        )
    )


def t5() -> Any:
    return T.T5ForConditionalGeneration(
        T.T5Config(
            num_layers=2,
            num_decoder_layers=2,
            d_model=16,
            d_kv=8,
            num_heads=2,
            d_ff=32,
            vocab_size=VOCAB,
        )
    )


MODELS: dict[str, Callable[[], Any]] = {
    "gpt2": gpt2,
    "gpt_neox": gpt_neox,
    "vit": vit,
    "mixtral": mixtral,
    "t5": t5,
}


def build(name: str) -> Any:
    """The model of `name` with the weights of `SEED`, in eval mode."""
    torch.manual_seed(SEED)
    return MODELS[name]().eval()


def meta_twin(model: Any) -> Any:
    """The same architecture on the meta device: names, shapes, types, no memory."""
    with torch.device("meta"):
        return type(model)(model.config)


def export(name: str, directory: Path) -> None:
    import bridge

    model = build(name)
    bridge.save(model, directory, format="safetensors", template=meta_twin(model))


def load(name: str, directory: Path) -> dict[str, Any]:
    """bridge's load of the Hub directory against transformers 5's own."""
    import bridge

    cls = type(build(name))
    reference = cls.from_pretrained(directory).state_dict()
    with torch.device("meta"):
        template = cls(cls.config_class.from_pretrained(directory))
    state, report = bridge.load(directory, to="torch", template=template, strict=False)
    return {
        "missing": [str(problem) for problem in report.missing],
        "unexpected": [str(problem) for problem in report.unexpected],
        "mismatched": [str(problem) for problem in report.mismatched],
        "different": sorted(
            key
            for key, tensor in reference.items()
            if key not in state
            or state[key].dtype != tensor.dtype
            or not torch.equal(state[key], tensor)
        ),
        "extra": sorted(set(state) - set(reference)),
    }


if __name__ == "__main__":
    command, where = sys.argv[1:]
    if command == "export":
        for model_name in MODELS:
            export(model_name, Path(where) / model_name)
    else:
        print(
            json.dumps(
                {model_name: load(model_name, Path(where) / model_name) for model_name in MODELS}
            )
        )
