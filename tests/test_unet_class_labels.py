"""UNet2DConditionModel with class labels (num_class_embeds) and only_cross_attention blocks, as the SD x4 upscaler's
UNet has them, against diffusers' PyTorch UNet2DConditionModel."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")
diffusers = pytest.importorskip("diffusers", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")

from sdjax.errors import ConfigError
from sdjax.models.unet_2d_condition import UNet2DConditionModel
from sdjax.testing import perturb_, rel_err

pytestmark = pytest.mark.parity

# The x4 upscaler's UNet in small: 7 input channels (4 latent + 3 image), noise level as a class label, a first
# block without attention, only_cross_attention on the high-resolution attention block, linear projections.
X4_LIKE = dict(
    in_channels=7, out_channels=4, block_out_channels=(32, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=(True, True, False), num_class_embeds=50, layers_per_block=1, norm_num_groups=8,
    cross_attention_dim=16, attention_head_dim=4, use_linear_projection=True, sample_size=8,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(diffusers.UNet2DConditionModel(**X4_LIKE).eval(), seed=3)
    folder = tmp_path_factory.mktemp("x4_like_unet")
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((3, 7, 8, 8)).astype(np.float32)
    text = rng.standard_normal((3, 5, 16)).astype(np.float32)
    labels = np.array([0, 20, 49], np.int64)
    with torch.no_grad():
        expected = model(torch.from_numpy(sample), torch.tensor([999, 500, 3]), torch.from_numpy(text),
                         class_labels=torch.from_numpy(labels)).sample.numpy()
    return dict(folder=folder, sample=sample, text=text, labels=labels, expected=expected, model=model)


def _apply(unet, params, ref, labels):
    fn = jax.jit(lambda p, x, t, c, y: unet.apply({"params": p}, x, t, c, class_labels=y))
    return np.asarray(fn(params, ref["sample"], jnp.array([999, 500, 3]), ref["text"], labels))


def test_class_labels_and_only_cross_attention_parity(reference):
    unet, params = UNet2DConditionModel.from_pretrained(reference["folder"])
    assert params["class_embedding"]["embedding"].shape == (50, 128)
    out = _apply(unet, params, reference, jnp.asarray(reference["labels"], jnp.int32))
    err = rel_err(out, reference["expected"])
    print(f"\nx4-like UNet (class labels, only_cross_attention): fp32 rel err {err:.2e}")
    assert err <= 1e-5
    # the labels matter: other labels give another output
    other = _apply(unet, params, reference, jnp.asarray([1, 21, 48], jnp.int32))
    assert rel_err(other, reference["expected"]) > 1e-3


def test_attn1_is_cross_attention_where_asked(reference):
    unet, params = UNet2DConditionModel.from_pretrained(reference["folder"])
    # attn1's key projection reads the text (width 16) in only_cross_attention blocks, the pixels (32/64) elsewhere
    k1 = lambda block: params[block]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_k"]["kernel"].shape[0]
    assert k1("down_blocks_1") == 16 and k1("up_blocks_1") == 16
    assert k1("down_blocks_2") == 64 and k1("up_blocks_0") == 64 and k1("mid_block") == 64


def test_save_round_trip_loads_in_diffusers(reference, tmp_path):
    unet, params = UNet2DConditionModel.from_pretrained(reference["folder"])
    unet.save_pretrained(tmp_path / "unet", params)
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert again.config.num_class_embeds == 50 and list(again.config.only_cross_attention) == [True, True, False]
    with torch.no_grad():
        out = again(torch.from_numpy(reference["sample"]), torch.tensor([999, 500, 3]),
                    torch.from_numpy(reference["text"]), class_labels=torch.from_numpy(reference["labels"])).sample
    assert rel_err(out.numpy(), reference["expected"]) <= 1e-6


def test_class_label_errors():
    unet = UNet2DConditionModel(**X4_LIKE)
    params = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
    x, ctx = jnp.zeros((2, 7, 8, 8)), jnp.zeros((2, 5, 16))
    with pytest.raises(ConfigError, match="num_class_embeds = 50: pass class_labels"):
        jax.eval_shape(lambda p: unet.apply({"params": p}, x, 1, ctx), params)
    with pytest.raises(ConfigError, match="class_labels must be integers"):
        jax.eval_shape(lambda p: unet.apply({"params": p}, x, 1, ctx, class_labels=jnp.ones(2)), params)
    with pytest.raises(ConfigError, match=r"class_labels has shape \(3,\)"):
        jax.eval_shape(lambda p: unet.apply({"params": p}, x, 1, ctx, class_labels=jnp.ones(3, jnp.int32)), params)
    # a scalar label broadcasts over the batch
    out = jax.eval_shape(lambda p: unet.apply({"params": p}, x, 1, ctx, class_labels=jnp.int32(3)), params)
    assert out.shape == (2, 4, 8, 8)
    # the other class embeddings are still refused, naming the key
    for key, value in (("class_embed_type", "timestep"), ("class_embeddings_concat", True)):
        with pytest.raises(ConfigError, match=key):
            UNet2DConditionModel.from_config(dict(X4_LIKE, **{key: value}))
    with pytest.raises(ConfigError, match="num_class_embeds"):
        UNet2DConditionModel.from_config(dict(X4_LIKE, num_class_embeds=0))


def test_without_class_embeds_labels_are_ignored():
    """As in diffusers: a UNet without num_class_embeds ignores class_labels; its params have no class_embedding."""
    cfg = dict(X4_LIKE, num_class_embeds=None)
    unet = UNet2DConditionModel(**cfg)
    params = unet.init_weights(jax.random.PRNGKey(0))
    assert "class_embedding" not in params
    x, ctx = jnp.ones((1, 7, 8, 8)), jnp.ones((1, 5, 16))
    a = unet.apply({"params": params}, x, 1, ctx)
    b = unet.apply({"params": params}, x, 1, ctx, class_labels=jnp.array([5]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
