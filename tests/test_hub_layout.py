"""Exports in the Hub's layout (issue 11, section 2).

With a transformers template, a safetensors export is what `save_pretrained` writes:
its checkpoint names (ViT's `attention.attention.query`, GPT-NeoX's `embed_out`,
Mixtral's per-expert `block_sparse_moe.experts.<i>.w1`), tied weights once, and
`config.json` / `generation_config.json`. The other way, a Hub directory loads into a
transformers 5 template. The `hf4` tests check both against transformers 4.57
(`make test-hf4`), driving transformers 5 through `tests/hub_models.py` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import bridge

sys.path.insert(0, str(Path(__file__).parent))
from hub_models import MODELS, build, meta_twin

ROOT = Path(__file__).parent.parent


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file read by the safetensors package."""
    with safe_open(path, framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118


def assert_same_tensors(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys, and per key the same dtype, shape and bytes."""
    assert sorted(ours) == sorted(expected)
    for key, tensor in expected.items():
        assert (ours[key].dtype, ours[key].shape) == (tensor.dtype, tensor.shape), key
        assert ours[key].contiguous().view(torch.uint8).equal(tensor.view(torch.uint8)), key


def loading_problems(info: dict[str, Any]) -> dict[str, list[str]]:
    """What `from_pretrained(..., output_loading_info=True)` could not load or place."""
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    return {kind: sorted(map(str, info[kind])) for kind in kinds if info[kind]}


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One model, its `save_pretrained` directory and bridge's export next to it."""
    model = build(request.param)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "reference")
    bridge.save(model, root / "bridge", format="safetensors", template=meta_twin(model))
    return request.param, model, root


def test_export_writes_what_save_pretrained_writes(saved: Any) -> None:
    name, _, root = saved
    files = sorted(os.listdir(root / "reference"))
    assert sorted(os.listdir(root / "bridge")) == files
    reference = tensors(root / "reference" / "model.safetensors")
    assert_same_tensors(tensors(root / "bridge" / "model.safetensors"), reference)
    assert len(reference) == {"gpt2": 28, "gpt_neox": 28, "vit": 40, "mixtral": 41, "t5": 47}[name]
    for json_file in (f for f in files if f.endswith(".json")):
        ours = json.loads((root / "bridge" / json_file).read_text())
        assert ours == json.loads((root / "reference" / json_file).read_text()), json_file
    # the files are the library's to the byte: header order, metadata, data
    reference_bytes = (root / "reference" / "model.safetensors").read_bytes()
    assert (root / "bridge" / "model.safetensors").read_bytes() == reference_bytes


def test_export_loads_in_transformers_5(saved: Any) -> None:
    _, model, root = saved
    loaded, info = type(model).from_pretrained(
        root / "bridge", config=model.config, output_loading_info=True
    )  # the config given: a missing config.json must not make a model of the default size
    assert loading_problems(info) == {}
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_hub_directory_loads_into_a_transformers_5_template(saved: Any) -> None:
    """save_pretrained's directory holds the Hub's (4.x) names and per-expert tensors."""
    _, model, root = saved
    state = bridge.load(root / "reference", to="torch", template=meta_twin(model))
    assert_same_tensors(state, model.state_dict())
    fresh = type(model)(model.config)
    assert fresh.load_state_dict(state, strict=True)  # every key, every shape
    assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_an_nnx_model_exports_in_the_hub_layout(tmp_path: Path) -> None:
    """The everyday export: an NNX GPT-2 with transformers' in-memory names."""
    from flax import nnx
    from nnx_gpt2 import Gpt2LMHead

    model = build("gpt2")
    abstract = nnx.eval_shape(lambda: Gpt2LMHead(model.config, nnx.Rngs(0)))
    nnx_model = bridge.convert(model, to="nnx", template=abstract)
    model.save_pretrained(tmp_path / "reference")
    bridge.save(nnx_model, tmp_path / "bridge", format="safetensors", template=meta_twin(model))
    reference = tensors(tmp_path / "reference" / "model.safetensors")
    assert_same_tensors(tensors(tmp_path / "bridge" / "model.safetensors"), reference)


def test_plan_and_report_name_the_checkpoint_mapping(tmp_path: Path) -> None:
    model = build("mixtral")
    rule = "transformers checkpoint mapping of MixtralForCausalLM"
    plan = bridge.plan(model, to="safetensors", template=meta_twin(model), path=tmp_path / "out")
    rows = {row.target: row for row in plan.rows}
    expert = rows["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    assert (expert.source, expert.transform) == (
        "model.layers.1.mlp.experts.gate_up_proj",
        f"converted by {rule}",
    )
    gate = rows["model.layers.0.block_sparse_moe.gate.weight"]
    assert (gate.source, gate.transform) == ("model.layers.0.mlp.gate.weight", f"renamed by {rule}")
    assert rows["lm_head.weight"].transform == ""
    assert any("written as 24" in note and rule in note for note in plan.report.notes)
    assert not (tmp_path / "out").exists()  # a plan writes nothing

    model.save_pretrained(tmp_path / "hub")
    _, report = bridge.load(tmp_path / "hub", to="torch", template=meta_twin(model), strict=False)
    assert report.ok
    assert (
        f"8 tensors (model.layers.0.block_sparse_moe.experts.0.w1.weight, ...) read as "
        f"model.layers.0.mlp.experts.gate_up_proj ({rule})" in report.notes
    )


def test_a_tensor_under_both_its_hub_and_its_own_name_is_refused(tmp_path: Path) -> None:
    model = build("mixtral")
    state = dict(model.state_dict())
    state["model.layers.0.block_sparse_moe.gate.weight"] = state["model.layers.0.mlp.gate.weight"]
    with pytest.raises(bridge.FormatError, match=r"block_sparse_moe\.gate\.weight"):
        bridge.convert(state, to="torch", template=meta_twin(model))


def test_tied_weights_are_stored_once_and_must_agree(tmp_path: Path) -> None:
    model = build("gpt2")
    _, report = bridge.convert(
        model, to="safetensors", template=meta_twin(model), path=tmp_path / "a", strict=False
    )
    assert (
        "lm_head.weight: tied to transformer.wte.weight, stored once, as save_pretrained does"
        in (report.notes)
    )
    untied = dict(model.state_dict())
    untied["lm_head.weight"] = untied["lm_head.weight"].clone()
    bridge.save(untied, tmp_path / "b", format="safetensors", template=meta_twin(model))
    assert "lm_head.weight" not in tensors(tmp_path / "b" / "model.safetensors")  # equal values
    untied["lm_head.weight"][0, 0] += 1  # now the two names hold different values
    with pytest.raises(bridge.FormatError, match=r"lm_head\.weight.*transformer\.wte\.weight"):
        bridge.save(untied, tmp_path / "c", format="safetensors", template=meta_twin(model))
    assert not (tmp_path / "c").exists()


def test_config_files_are_optional_and_never_replaced_unasked(tmp_path: Path) -> None:
    model = build("gpt2")
    template = meta_twin(model)
    bridge.save(model, tmp_path / "bare", format="safetensors", template=template, config=False)
    assert os.listdir(tmp_path / "bare") == ["model.safetensors"]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")  # the user's, whatever it says
    _, report = bridge.convert(
        model, to="safetensors", template=template, path=tmp_path / "mine", strict=False
    )
    assert (tmp_path / "mine" / "config.json").read_text() == "{}"
    assert any("config.json: kept" in note for note in report.notes)
    assert (tmp_path / "mine" / "generation_config.json").is_file()
    bridge.save(model, tmp_path / "mine", format="safetensors", template=template, overwrite=True)
    assert json.loads((tmp_path / "mine" / "config.json").read_text())["architectures"] == [
        "GPT2LMHeadModel"
    ]
    assert model.config.architectures is None  # the template's config is not changed


def test_a_hub_directory_cast_in_place_keeps_the_hub_layout(tmp_path: Path) -> None:
    """Read through a transformers template and written back: the Hub's names both ways,
    and the config says the new dtype, as save_pretrained of the cast model would."""
    model = build("mixtral")
    model.save_pretrained(tmp_path)
    before = tensors(tmp_path / "model.safetensors")
    template = meta_twin(model).to(torch.bfloat16)
    bridge.save(
        tmp_path,
        tmp_path,
        format="safetensors",
        template=template,
        dtype="bfloat16",
        overwrite=True,
    )
    cast = {key: tensor.to(torch.bfloat16) for key, tensor in before.items()}
    assert_same_tensors(tensors(tmp_path / "model.safetensors"), cast)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_export_holds_what_save_pretrained_holds(tmp_path: Path) -> None:
    """The same tensors under the same names across the shards. Which shard holds which
    tensor may differ: huggingface_hub keeps tensors that are views of one storage (the
    experts split from one fused tensor) in one shard and counts the storage once, while
    bridge counts each tensor's own bytes."""
    model = build("mixtral")
    model.save_pretrained(tmp_path / "reference", max_shard_size="20KB")
    bridge.save(
        model,
        tmp_path / "bridge",
        format="safetensors",
        template=meta_twin(model),
        max_shard_size="20KB",
    )

    def sharded(directory: Path) -> dict[str, torch.Tensor]:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(tensors(directory / shard))
        assert sorted(out) == sorted(index["weight_map"])
        return out

    assert_same_tensors(sharded(tmp_path / "bridge"), sharded(tmp_path / "reference"))


# ---- transformers 4.57 (make test-hf4): the Hub's other readers and writers ----


def transformers_5(*args: str) -> str:
    """Run tests/hub_models.py with transformers 5.x: the main environment's Python,
    `BRIDGE_HF5_PYTHON` (the Makefile sets it), else `.venv/bin/python`."""
    python = os.environ.get("BRIDGE_HF5_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    assert Path(python).is_file(), f"no transformers 5 Python at {python}; set BRIDGE_HF5_PYTHON"
    done = subprocess.run(
        [python, str(Path(__file__).parent / "hub_models.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bridge's exports of every model, made with transformers 5."""
    root = tmp_path_factory.mktemp("exported")
    transformers_5("export", str(root))
    return root


@pytest.mark.hf4
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_loads_in_transformers_4(name: str, exported: Path) -> None:
    """bridge's export (transformers 5) loads in 4.57 with every key, no key left over,
    and 4.57 holds exactly the tensors of the files."""
    model = build(name)
    loaded, info = type(model).from_pretrained(
        exported / name, config=model.config, output_loading_info=True
    )
    assert loading_problems(info) == {}
    state = loaded.state_dict()
    for key, tensor in tensors(exported / name / "model.safetensors").items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


@pytest.fixture(scope="module")
def loaded_in_5(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4.57's save_pretrained of every model, read by bridge into 5.x templates."""
    root = tmp_path_factory.mktemp("transformers4")
    for name in MODELS:
        build(name).save_pretrained(root / name, safe_serialization=True)
    return json.loads(transformers_5("load", str(root)))


@pytest.mark.hf4
@pytest.mark.parametrize("name", sorted(MODELS))
def test_transformers_4_directory_loads_into_a_transformers_5_template(
    name: str, loaded_in_5: dict[str, Any]
) -> None:
    """Every key of the 5.x template filled, none left over, and every tensor what
    transformers 5's own from_pretrained loads from 4.57's directory."""
    assert loaded_in_5[name] == {
        "missing": [],
        "unexpected": [],
        "mismatched": [],
        "different": [],
        "extra": [],
    }


def test_cli_shards_as_save_pretrained_and_writes_no_config_when_told(tmp_path: Path) -> None:
    """`bridge convert --max-shard-size --no-config` with a transformers template: the
    shards and index of `save_pretrained`, and no config files."""
    from test_cli import run

    model = build("gpt2")
    model.save_pretrained(tmp_path / "reference", max_shard_size="20KB")
    bridge.save(model, tmp_path / "bare", format="safetensors", config=False)
    (tmp_path / "gpt2_template.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from hub_models import build, meta_twin\n"
        "template = meta_twin(build('gpt2'))\n"
    )
    common = ["--to", "safetensors", "--template", "gpt2_template.py", "--max-shard-size", "20KB"]
    done = run(tmp_path, "convert", "bare/model.safetensors", "out", *common, "--no-config")
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    reference = json.loads((tmp_path / "reference" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == reference["weight_map"]
    shards = set(index["weight_map"].values())
    assert set(os.listdir(tmp_path / "out")) == shards | {"model.safetensors.index.json"}
    for shard in shards:
        assert_same_tensors(
            tensors(tmp_path / "out" / shard), tensors(tmp_path / "reference" / shard)
        )

    refused = run(
        tmp_path, "convert", "bare/model.safetensors", "ckpt", "--to", "orbax", "--no-config"
    )
    assert refused.returncode == 2 and "--no-config is for --to safetensors" in refused.stderr
    assert not (tmp_path / "ckpt").exists()
