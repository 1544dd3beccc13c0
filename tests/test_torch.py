"""PyTorch <-> NNX / Linen: the layout table on real torch modules, both directions."""

from __future__ import annotations

import math
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_same_arrays, assert_state_dicts_equal
from flax import nnx

import bridge

ROTATION = math.pi / 4
MOTIVATING_CASES = {
    "select": ([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], [0, 0, 0, 0], [1, 2, 3], [1, 2, 3, 0]),
    "ones": ([[1, 1, 1], [1, 1, 1]], [1, -1], [1, 2, 3], [7, 5]),
    "cycle": ([[0, 0, 1], [1, 0, 0], [0, 1, 0]], [0.5] * 3, [1, 2, 3], [3.5, 1.5, 2.5]),
    "rotate": (
        [[math.cos(ROTATION), -math.sin(ROTATION)], [math.sin(ROTATION), math.cos(ROTATION)]],
        [0, 0],
        [1, 0],
        [math.sqrt(0.5), math.sqrt(0.5)],
    ),
}


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("case", MOTIVATING_CASES)
def test_motivating_cases_torch_layout_into_nnx_linear_and_linen_dense(case, as_torch):
    weight, bias, x, expected = (np.asarray(v, np.float32) for v in MOTIVATING_CASES[case])
    state = {"weight": weight, "bias": bias}
    if as_torch:
        state = {key: torch.from_numpy(value) for key, value in state.items()}
    out_features, in_features = weight.shape

    linear = bridge.convert(
        state, to="nnx", template=nnx.Linear(in_features, out_features, rngs=nnx.Rngs(0))
    )
    np.testing.assert_allclose(linear(jnp.asarray(x)), expected, atol=1e-6)

    dense = nn.Dense(out_features)
    abstract = jax.eval_shape(dense.init, jax.random.key(0), jnp.ones((1, in_features)))
    variables = bridge.convert(state, to="linen", template=abstract)
    np.testing.assert_allclose(dense.apply(variables, jnp.asarray(x)), expected, atol=1e-6)

    back = bridge.convert(linear, to="torch")
    assert_same_arrays(back["weight"].numpy(), weight)
    assert_same_arrays(back["bias"].numpy(), bias)


class TorchCnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.up = torch.nn.ConvTranspose2d(8, 4, (3, 2), stride=2)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(self.up(x).mean(dim=(2, 3)))


class NnxCnn(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(3, 8, (3, 3), padding="VALID", rngs=rngs)
        self.bn = nnx.BatchNorm(8, use_running_average=True, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.up = nnx.ConvTranspose(8, 4, (3, 2), strides=2, padding="VALID", rngs=rngs)
        self.head = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.conv(x)))
        return self.head(self.up(x).mean(axis=(1, 2)))


class LinenCnn(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(8, (3, 3), padding="VALID", name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x))
        x = nn.ConvTranspose(4, (3, 2), strides=(2, 2), padding="VALID", name="up")(x)
        return nn.Dense(5, name="head")(x.mean(axis=(1, 2)))


def trained_torch_cnn() -> TorchCnn:
    """A CNN whose BatchNorm statistics moved away from 0 and 1 in a training pass."""
    torch.manual_seed(0)
    model = TorchCnn()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 9, 9) * 2 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, jax.Array]:
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    return x, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("given", ["module", "state_dict"])
def test_cnn_parity_with_nnx_and_bit_exact_round_trip(given, images):
    torch_model = trained_torch_cnn()
    assert not torch.allclose(torch_model.bn.running_var, torch.ones(8))
    source = torch_model if given == "module" else torch_model.state_dict()
    template = nnx.eval_shape(lambda: NnxCnn(nnx.Rngs(0)))
    model = bridge.convert(source, to="nnx", template=template)
    x_torch, x_jax = images
    with torch.no_grad():
        expected = torch_model(x_torch).numpy()
    np.testing.assert_allclose(model(x_jax), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(model.bn.mean, nnx.BatchStat)

    back = bridge.convert(model, to="torch", template=torch_model)
    assert_state_dicts_equal(back, torch_model.state_dict())
    fresh = TorchCnn()
    fresh.load_state_dict(back, strict=True)


def test_cnn_through_a_linen_template(images):
    torch_model = trained_torch_cnn()
    x_torch, x_jax = images
    template = jax.eval_shape(LinenCnn().init, jax.random.key(0), x_jax)
    variables = bridge.convert(torch_model, to="linen", template=template)
    assert set(variables) == {"params", "batch_stats"}
    with torch.no_grad():
        expected = torch_model(x_torch).numpy()
    np.testing.assert_allclose(LinenCnn().apply(variables, x_jax), expected, atol=1e-5, rtol=1e-5)
    back = bridge.convert(variables, to="torch", template=torch_model)
    assert_state_dicts_equal(back, torch_model.state_dict())


def test_num_batches_tracked_is_reported_not_silently_lost():
    plan = bridge.plan(
        trained_torch_cnn(), to="nnx", template=nnx.eval_shape(lambda: NnxCnn(nnx.Rngs(0)))
    )
    assert any("bn.num_batches_tracked" in entry for entry in plan.report.dropped)
    rows = {row.target: row for row in plan.rows}
    assert rows["conv.kernel"].transform == "permute"
    assert rows["up.kernel"].transform == "permute+flip"
    assert rows["head.kernel"].transform == "transpose"
    assert rows["bn.mean"].source == "bn.running_mean"


@pytest.mark.parametrize("through", ["nnx_state", "linen"])
def test_num_batches_tracked_is_carried_where_a_flax_state_can_hold_it(through):
    source = trained_torch_cnn()
    source.bn.num_batches_tracked.fill_(17)
    back = bridge.convert(bridge.convert(source, to=through), to="torch", template=TorchCnn())
    assert int(back["bn.num_batches_tracked"]) == 17
    assert_state_dicts_equal(back, source.state_dict())


def test_export_into_a_meta_device_template_with_batchnorm():
    model = bridge.convert(
        trained_torch_cnn(), to="nnx", template=nnx.eval_shape(lambda: NnxCnn(nnx.Rngs(0)))
    )
    with torch.device("meta"):
        template = TorchCnn()
    state, report = bridge.convert(model, to="torch", template=template, strict=False)
    assert report.ok
    assert int(state["bn.num_batches_tracked"]) == 0  # no Flax module keeps the count
    assert "bn.num_batches_tracked: re-created (abstract template)" in report.notes
    fresh = TorchCnn()
    fresh.load_state_dict(state, strict=True)


def test_conv_transpose_rule_matches_torch_numerically():
    torch.manual_seed(3)
    for dims in (1, 2, 3):
        layer = getattr(torch.nn, f"ConvTranspose{dims}d")(3, 2, (3, 2, 2)[:dims], stride=2)
        x = torch.randn(1, 3, *(4,) * dims)
        template = nnx.ConvTranspose(
            3, 2, (3, 2, 2)[:dims], strides=2, padding="VALID", rngs=nnx.Rngs(0)
        )
        converted = bridge.convert(layer, to="nnx", template=template)
        moved = (0, *range(2, dims + 2), 1)
        y = converted(jnp.asarray(x.numpy().transpose(moved)))
        with torch.no_grad():
            expected = layer(x).numpy().transpose(moved)
        np.testing.assert_allclose(y, expected, atol=1e-5)


class NnxAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.attn = nnx.MultiHeadAttention(4, 16, decode=False, rngs=rngs)


@pytest.mark.parametrize("given", ["module", "state_dict"])
def test_multihead_attention_parity_both_ways(given):
    torch.manual_seed(0)
    wrapper = torch.nn.Module()
    wrapper.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    template = nnx.eval_shape(lambda: NnxAttention(nnx.Rngs(0)))
    source = wrapper if given == "module" else wrapper.state_dict()
    model = bridge.convert(source, to="nnx", template=template)
    with torch.no_grad():
        expected = wrapper.attn(x, x, x, need_weights=False)[0].numpy()
    np.testing.assert_allclose(model.attn(jnp.asarray(x.numpy())), expected, atol=1e-5)
    plan = bridge.plan(source, to="nnx", template=template)
    assert {row.target: row.transform for row in plan.rows}["attn.key.kernel"] == (
        "split 2/3, transpose, reshape (16, 4, 4)"
    )

    back = bridge.convert(model, to="torch", template=wrapper)
    assert_state_dicts_equal(back, wrapper.state_dict())


def test_linen_multi_head_dot_product_attention_from_torch():
    torch.manual_seed(1)
    wrapper = torch.nn.Module()
    wrapper.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 3, 8)
    module = nn.MultiHeadDotProductAttention(num_heads=2)

    class Holder(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)

    x_jax = jnp.asarray(x.numpy())
    template = jax.eval_shape(Holder().init, jax.random.key(0), x_jax)
    variables = bridge.convert(wrapper, to="linen", template=template)
    with torch.no_grad():
        expected = wrapper.attn(x, x, x, need_weights=False)[0].numpy()
    np.testing.assert_allclose(Holder().apply(variables, x_jax), expected, atol=1e-5)
    del module


def test_square_weights_next_to_conv1d_style_weights_are_refused_not_guessed():
    rng = np.random.default_rng(0)
    state = {  # a fused projection stored (in, out) as HF Conv1D does, and a square one
        "fused.weight": rng.normal(size=(4, 12)).astype(np.float32),
        "proj.weight": rng.normal(size=(4, 4)).astype(np.float32),
    }

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.fused = nnx.Linear(4, 12, use_bias=False, rngs=rngs)
            self.proj = nnx.Linear(4, 4, use_bias=False, rngs=rngs)

    template = nnx.eval_shape(lambda: Two(nnx.Rngs(0)))
    with pytest.raises(bridge.MismatchError, match=r"(?s)proj\.weight.*square.*modules="):
        bridge.convert(state, to="nnx", template=template)
    model = bridge.convert(
        state, to="nnx", template=template, modules={r"^(fused|proj)$": "Conv1D"}
    )
    assert_same_arrays(model.proj.kernel.get_value(), state["proj.weight"])
    assert_same_arrays(model.fused.kernel.get_value(), state["fused.weight"])


def test_weight_of_unknown_role_without_template_is_refused():
    with pytest.raises(bridge.MismatchError, match="kernel from embedding"):
        bridge.convert({"layer.weight": np.ones((3, 2), np.float32)}, to="nnx_state")


def test_pt_files_load_with_weights_only_and_malicious_pickles_are_refused(tmp_path):
    torch_model = trained_torch_cnn()
    path = tmp_path / "model.pt"
    torch.save(torch_model.state_dict(), path)
    assert bridge.detect(str(path)) == "torch"
    model = bridge.convert(path, to="nnx", template=nnx.eval_shape(lambda: NnxCnn(nnx.Rngs(0))))
    assert_same_arrays(model.bn.var.get_value(), torch_model.bn.running_var.numpy())

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as file:
        pickle.dump({"weight": Exploit()}, file)
    with pytest.raises(bridge.FormatError, match=r"evil\.pt.*refused"):
        bridge.convert(evil, to="nnx_state")

    broken = tmp_path / "broken.bin"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(bridge.FormatError, match=r"broken\.bin"):
        bridge.convert(broken, to="nnx_state", modules={".*": "Linear"})


def test_cnn_from_safetensors_and_back_bit_exact(tmp_path, images):
    from safetensors.torch import save_file

    torch_model = trained_torch_cnn()
    original = torch_model.state_dict()
    save_file(original, tmp_path / "cnn.safetensors")
    before = (tmp_path / "cnn.safetensors").read_bytes()
    template = nnx.eval_shape(lambda: NnxCnn(nnx.Rngs(0)))
    model = bridge.convert(tmp_path / "cnn.safetensors", to="nnx", template=template)
    x_torch, x_jax = images
    with torch.no_grad():
        expected = torch_model(x_torch).numpy()
    np.testing.assert_allclose(model(x_jax), expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "cnn.safetensors").read_bytes() == before  # input untouched

    out = bridge.save(
        model, tmp_path / "out.safetensors", format="safetensors", template=torch_model
    )
    reloaded = bridge.convert(out, to="torch")
    assert_state_dicts_equal(reloaded, original)


def test_wrong_shape_in_a_file_names_the_file_and_the_key(tmp_path):
    from safetensors.torch import save_file

    state = dict(trained_torch_cnn().state_dict())
    state["head.weight"] = torch.zeros(5, 3)
    save_file(state, tmp_path / "bad.safetensors")
    template = nnx.eval_shape(lambda: NnxCnn(nnx.Rngs(0)))
    with pytest.raises(bridge.MismatchError) as caught:
        bridge.convert(tmp_path / "bad.safetensors", to="nnx", template=template)
    message = str(caught.value)
    assert "bad.safetensors" in message
    assert "head.kernel: expected shape (4, 5) float32" in message and "head.weight" in message


def test_multihead_attention_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    wrapper = torch.nn.Module()
    wrapper.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    save_file(wrapper.state_dict(), tmp_path / "mha.safetensors")
    template = nnx.eval_shape(lambda: NnxAttention(nnx.Rngs(0)))
    model = bridge.convert(tmp_path / "mha.safetensors", to="nnx", template=template)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        expected = wrapper.attn(x, x, x, need_weights=False)[0].numpy()
    np.testing.assert_allclose(model.attn(jnp.asarray(x.numpy())), expected, atol=1e-5)


def test_cast_on_load_bf16_file_to_f32_model_and_back(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    layer = torch.nn.Linear(6, 4).to(torch.bfloat16)
    save_file(layer.state_dict(), tmp_path / "bf16.safetensors")
    template = nnx.eval_shape(lambda: nnx.Linear(6, 4, rngs=nnx.Rngs(0)))  # float32
    with pytest.raises(bridge.MismatchError, match="bfloat16"):
        bridge.convert(tmp_path / "bf16.safetensors", to="nnx", template=template)
    model = bridge.convert(
        tmp_path / "bf16.safetensors", to="nnx", template=template, dtype="float32"
    )
    assert model.kernel.get_value().dtype == jnp.float32
    np.testing.assert_array_equal(model.kernel.get_value(), layer.weight.detach().float().numpy().T)

    out = bridge.save(
        model, tmp_path / "back.safetensors", format="safetensors", dtype=jnp.bfloat16
    )
    back = bridge.convert(out, to="torch")
    assert back["weight"].dtype == torch.bfloat16
    assert torch.equal(back["weight"], layer.weight.detach())


def test_a_pt_file_saved_from_nnx_holds_the_torch_state_dict(tmp_path):
    """`bridge.save(..., format="torch")` writes what `torch.save(state_dict)` writes:
    torch loads it with `weights_only=True` into the source module, bit for bit; the
    file is atomic, replaced only with `overwrite=True`, and named as torch files are."""
    torch_model = trained_torch_cnn()
    original = torch_model.state_dict()
    model = bridge.convert(
        torch_model, to="nnx", template=nnx.eval_shape(lambda: NnxCnn(nnx.Rngs(0)))
    )
    path = tmp_path / "cnn.pt"
    assert bridge.save(model, path, format="torch", template=torch_model) == path.absolute()
    saved = torch.load(path, weights_only=True)
    assert list(saved) == list(original)
    assert_state_dicts_equal(saved, original)

    with pytest.raises(bridge.OutputExistsError):
        bridge.save(model, path, format="torch", template=torch_model)
    assert_state_dicts_equal(torch.load(path, weights_only=True), original)
    bridge.save(model, path, format="torch", template=torch_model, overwrite=True)
    assert_state_dicts_equal(torch.load(path, weights_only=True), original)
    with pytest.raises(bridge.FormatError, match=r"cnn\.safetensors: a torch file is named"):
        bridge.save(model, tmp_path / "cnn.safetensors", format="torch", template=torch_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.pt"]
