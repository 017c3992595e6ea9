"""LoRA and textual inversion on the pipeline (sdjax.pipelines.adapters) against diffusers' PyTorch pipeline.

End to end on the tiny random SD folder (fp32, CPU), the same initial latents on both sides, per-step latents and
images compared:
  * UNet LoRAs made by PEFT and saved by diffusers (tests/test_lora.py's `lora_files`: "a" with its LoraConfig as
    metadata, alpha != rank; "b" without; "kohya", a Kohya file written from a's numbers with per-layer alphas):
    diffusers' `load_lora_weights` + `set_adapters` vs sdjax's `load_lora_weights` + `lora_scale=` at 0, 0.5, 1.0
    and two adapters mixed;
  * text-encoder LoRA: transformers 5's PEFT integration needs peft >= 0.22, which the registry does not serve, so
    diffusers cannot load text-encoder LoRAs here. The reference is computed in PyTorch by hand from the file:
    each text-encoder layer's weight + scale x alpha/rank x up @ down, written into diffusers' own pipeline
    (whose UNet LoRA is loaded by diffusers), then run end to end;
  * textual inversion: diffusers' `load_textual_inversion` vs sdjax's (a multi-vector token);
SDXL (no sdjax SDXL pipeline yet): the UNet (text_time) with a PEFT LoRA against diffusers'
StableDiffusionXLPipeline.load_lora_weights, text_encoder_2 (CLIPTextModelWithProjection) by the hand reference, a
Kohya `lora_te2_` file, and an SDXL textual-inversion file (clip_l + clip_g) against diffusers' two-step load; the
pipeline wiring (load_lora_weights over unet, text_encoder, text_encoder_2; merge inside the compiled program) on a
minimal pipeline with SDXL's components.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import convert
from sdjax.errors import AdapterError, InputError, SdjaxError
from sdjax.io import write_safetensors
from sdjax.lora import LoraAdapter, load_lora, merge_lora
from sdjax.pipelines.engine import run_jit
from sdjax.testing import TEXT, TEXT_2, rel_err

from .test_lora import TEXT_TARGETS, UNET_TARGETS, lora_files, peft_state, to_kohya  # noqa: F401 (fixture)

PROMPTS = ["a red circle on the moon", "a photo of an astronaut riding horse"]
STEPS = 4
SIZE = 32
GUIDANCE = 7.5
IMAGE_TOL = 1e-5  # the base pipeline's parity here is ~5e-6 (image abs) and ~4e-6 (per-step rel)
STEP_TOL = 1e-5


def initial_latents(seed=0):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (len(PROMPTS), 4, SIZE // 2, SIZE // 2)), np.float32)


@pytest.fixture(scope="module")
def sd(tiny_pipeline):
    return tiny_pipeline


def torch_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_torch(pipe, latents, prompts=PROMPTS):
    import torch

    steps = []

    def keep(p, i, t, kw):
        steps.append(kw["latents"].detach().numpy().copy())
        return kw

    with torch.no_grad():
        out = pipe(prompts, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=torch.from_numpy(latents), output_type="np", callback_on_step_end=keep)
    return out.images, np.stack(steps)


def run_sdjax(pipe, params, latents, prompts=PROMPTS, **kw):
    out = pipe(pipe.prepare_inputs(prompts), params, jax.random.PRNGKey(0), num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, height=SIZE, width=SIZE, latents=latents, **kw)
    return np.asarray(out.images), np.asarray(out.trajectory.latents[1:])


def compare(ours, ref):
    """(image max abs err, per-step latents max rel err)."""
    (images, steps), (ref_images, ref_steps) = ours, ref
    assert steps.shape == ref_steps.shape
    return (float(np.abs(images - ref_images).max()),
            max(rel_err(steps[i], ref_steps[i]) for i in range(len(ref_steps))))


# ---------------------------------------------------------------------------------------------- parity: UNet LoRA
@pytest.mark.parity
@pytest.mark.slow
def test_lora_scales_and_mix_match_diffusers_end_to_end(sd, tiny_folder, lora_files):
    pipe, params = sd
    latents = initial_latents()
    ref = torch_pipeline(tiny_folder)
    for name in ("a", "kohya", "b"):
        ref.load_lora_weights(str(lora_files[name]), adapter_name=name)
        params = pipe.load_lora_weights(lora_files[name], params, adapter_name=name)
    assert sorted(params["lora"]) == ["a", "b", "kohya"]
    # as loaded, before any set_adapters: diffusers runs only the last adapter loaded ("b"), and so does sdjax
    as_loaded = run_sdjax(pipe, params, latents)
    loaded_err = compare(as_loaded, run_torch(ref, latents))
    print(f"\n[UNet LoRA as loaded: only 'b' active] image max abs err {loaded_err[0]:.1e}; "
          f"per-step latents max rel err {loaded_err[1]:.1e}")
    assert loaded_err[0] <= IMAGE_TOL and loaded_err[1] <= STEP_TOL
    np.testing.assert_array_equal(as_loaded[0], run_sdjax(pipe, pipe.set_adapters(params, ["b"]), latents)[0])

    cases = [({"a": s}, s) for s in (0.0, 0.5, 1.0)] + [({"kohya": 0.5}, None), ({"a": 0.7, "b": -0.6}, None)]
    results, before = [], None
    for scales, _ in cases:
        ref.set_adapters(list(scales), list(scales.values()))
        torch_out = run_torch(ref, latents)
        # sdjax: every adapter is applied unless its scale is 0 (diffusers: those set_adapters names)
        call = {n: scales.get(n, 0.0) for n in params["lora"]}
        ours = run_sdjax(pipe, params, latents, lora_scale=call)
        if before is None:
            before = run_jit._cache_size()
        results.append((scales, *compare(ours, torch_out), torch_out))
    for scales, image_err, step_err, _ in results:
        print(f"\n[UNet LoRA {scales}] image max abs err {image_err:.1e}; per-step latents max rel err {step_err:.1e}")
    assert max(r[1] for r in results) <= IMAGE_TOL
    assert max(r[2] for r in results) <= STEP_TOL
    assert run_jit._cache_size() == before, "changing the scales must not compile a new program"
    # the LoRA does change the result, and scale 0 is the model without it
    assert np.abs(results[0][3][0] - results[2][3][0]).max() > 1e-2
    base = run_sdjax(pipe, pipe.unload_lora_weights(params), latents)
    np.testing.assert_allclose(base[0], run_sdjax(pipe, params, latents, lora_scale=0.0)[0], atol=1e-6)


@pytest.mark.parity
def test_text_encoder_lora_end_to_end_against_hand_merged_reference(sd, tiny_folder, lora_files):
    """UNet LoRA "a" (diffusers loads it) + a text-encoder LoRA (diffusers cannot load it here: the reference merges
    W + scale * alpha/rank * up @ down into transformers' weights by hand), per-component scales."""
    import torch

    pipe, params = sd
    names = [f"encoder.layers.{i}.{m}" for i in range(TEXT["num_hidden_layers"]) for m in TEXT_TARGETS]
    state = peft_state(params, "text_encoder", names, rank=4, seed=7, prefix="text_model.")
    alpha, te_scale, unet_scale = 6.0, 0.8, 0.5
    metadata = {"text_encoder.r": 4, "text_encoder.lora_alpha": alpha}
    params = pipe.load_lora_weights(lora_files["a"], params, adapter_name="a")
    params = pipe.load_lora_weights(state, params, adapter_name="te", metadata=metadata)
    latents = initial_latents(1)

    ref = torch_pipeline(tiny_folder)
    ref.load_lora_weights(str(lora_files["a"]), adapter_name="a")
    ref.set_adapters(["a"], [unet_scale])
    sd_te = ref.text_encoder.state_dict()
    with torch.no_grad():
        for n in names:
            down = state[f"text_encoder.text_model.{n}.lora_A.weight"]
            up = state[f"text_encoder.text_model.{n}.lora_B.weight"]
            key = next(k for k in sd_te if k.endswith(f"{n}.weight"))
            sd_te[key] += te_scale * alpha / 4 * torch.from_numpy(up @ down)
    ref.text_encoder.load_state_dict(sd_te)
    image_err, step_err = compare(run_sdjax(pipe, params, latents, lora_scale={"a": unet_scale, "te": te_scale}),
                                  run_torch(ref, latents))
    print(f"\n[UNet LoRA 0.5 + text-encoder LoRA 0.8 (hand reference)] image max abs err {image_err:.1e}; "
          f"per-step latents max rel err {step_err:.1e}")
    assert image_err <= IMAGE_TOL and step_err <= STEP_TOL
    # per component: the text encoder's part off is the UNet LoRA alone
    only_unet = pipe.load_lora_weights(lora_files["a"], sd[1], adapter_name="a")
    np.testing.assert_allclose(run_sdjax(pipe, params, latents, lora_scale={"a": 0.3, "te": {"text_encoder": 0.0}})[0],
                               run_sdjax(pipe, only_unet, latents, lora_scale={"a": 0.3})[0], atol=1e-6)


@pytest.mark.parity
def test_textual_inversion_end_to_end(sd, tiny_folder, tmp_path):
    pipe, params = sd
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((2, TEXT["hidden_size"])).astype(np.float32)
    write_safetensors(tmp_path / "learned_embeds.safetensors", {"<toy>": emb})
    prompts = ["a <toy> on the moon", "a red circle"]
    latents = initial_latents(2)

    ref = torch_pipeline(tiny_folder)
    ref.load_textual_inversion(str(tmp_path))
    ref_out = run_torch(ref, latents, prompts)  # diffusers writes `<toy>` as `<toy> <toy>_1` itself (encode_prompt)
    n = len(pipe.tokenizer)
    pipe2, params2 = pipe.load_textual_inversion(tmp_path, params)
    assert len(pipe.tokenizer) == n and pipe.text_encoder.vocab_size == n, "the original pipeline is unchanged"
    assert pipe2.text_encoder.vocab_size == n + 2 and params["text_encoder"] is not params2["text_encoder"]
    assert pipe2.prepare_inputs(prompts)[0, 2:4].tolist() == [n, n + 1]
    image_err, step_err = compare(run_sdjax(pipe2, params2, latents, prompts), ref_out)
    print(f"\n[textual inversion, 2 vectors] image max abs err {image_err:.1e}; per-step latents max rel err "
          f"{step_err:.1e}")
    assert image_err <= IMAGE_TOL and step_err <= STEP_TOL
    with pytest.raises(AdapterError, match=r"token\(s\) \['<toy>', '<toy>_1'\] already in the tokenizer"):
        pipe2.load_textual_inversion(tmp_path, params2)
    with pytest.raises(SdjaxError, match="outside the text encoder's vocabulary"):  # the old pipeline, new ids
        pipe(pipe2.prepare_inputs(prompts), params, jax.random.PRNGKey(0), num_inference_steps=1)


# ---------------------------------------------------------------------------------------------- no torch needed
def test_fuse_unfuse_and_no_recompile(sd, lora_files):
    pipe, params = sd
    params = pipe.load_lora_weights(lora_files["a"], params, adapter_name="a")
    params = pipe.load_lora_weights(lora_files["b"], params, adapter_name="b")
    latents = initial_latents(4)
    kw = dict(return_trajectory=False)
    live = run_sdjax_images(pipe, params, latents, lora_scale={"a": 0.7, "b": 0.4}, **kw)
    size = run_jit._cache_size()
    for scale in (0.0, 1.0, {"a": 0.2, "b": {"unet": -1.0}}, 2.5):
        run_sdjax_images(pipe, params, latents, lora_scale=scale, **kw)
    set_params = pipe.set_adapters(params, ["a", "b"], [0.7, 0.4])
    np.testing.assert_array_equal(run_sdjax_images(pipe, set_params, latents, **kw), live)
    assert run_jit._cache_size() == size, "scales (numbers, dicts, set_adapters) must not recompile"

    fused = pipe.fuse_lora(set_params)
    assert "lora" not in fused and sorted(fused["lora_fused"]) == ["a", "b"]
    np.testing.assert_allclose(run_sdjax_images(pipe, fused, latents, **kw), live, atol=2e-5)
    back = pipe.unfuse_lora(fused)
    err = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree_util.tree_leaves({k: back[k] for k in ("unet", "text_encoder")}),
                                                          jax.tree_util.tree_leaves({k: params[k] for k in ("unet", "text_encoder")})))
    print(f"\n[fuse_lora then unfuse_lora] params max abs err {err:.1e}")
    assert err <= 1e-6
    assert sorted(back["lora"]) == ["a", "b"] and float(back["lora_scale"]["b"]["unet"]) == np.float32(0.4)
    # a fused adapter's scale times lora_scale; one adapter fused, the other live
    assert float(params["lora_scale"]["a"]["unet"]) == 0.0  # "b", loaded last, is the active one
    half = pipe.fuse_lora(pipe.set_adapters(params, ["a", "b"]), lora_scale=0.7, adapter_names="a")
    np.testing.assert_allclose(run_sdjax_images(pipe, half, latents, lora_scale={"b": 0.4}, **kw), live, atol=2e-5)
    # the params without adapters are the same program as before any adapter was loaded
    n = run_jit._cache_size()
    run_sdjax_images(pipe, pipe.unload_lora_weights(fused), latents, **kw)
    run_sdjax_images(pipe, sd[1], latents, **kw)
    assert run_jit._cache_size() <= n + 1
    assert sorted(pipe.delete_adapters(back, ["a", "b"])) == sorted(sd[1])
    assert sorted(pipe.delete_adapters(fused, "a")["lora_fused"]) == ["b"]


def run_sdjax_images(pipe, params, latents, **kw):
    out = pipe(pipe.prepare_inputs(PROMPTS), params, jax.random.PRNGKey(0), num_inference_steps=2,
               guidance_scale=GUIDANCE, height=SIZE, width=SIZE, latents=latents, **kw)
    return np.asarray(out.images)


def test_pmap_and_mesh_with_lora_match_single_device(sd, lora_files):
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard
    from jax.sharding import Mesh

    pipe, params = sd
    params = pipe.load_lora_weights(lora_files["a"], params, adapter_name="a")
    n_dev = jax.local_device_count()
    prompts = (PROMPTS * n_dev)[:n_dev]
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (n_dev, 4, SIZE // 2, SIZE // 2)), np.float32)
    kw = dict(num_inference_steps=2, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, return_trajectory=False,
              lora_scale={"a": 0.6})
    ids = pipe.prepare_inputs(prompts)
    single = np.asarray(pipe(ids, params, jax.random.PRNGKey(0), latents=latents, **kw).images)
    pmapped = pipe(shard(ids), replicate(params), jax.random.split(jax.random.PRNGKey(0), n_dev),
                   latents=shard(latents), jit=True, **kw)
    np.testing.assert_allclose(np.asarray(pmapped.images).reshape(single.shape), single, atol=1e-5)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    meshed = pipe(ids, params, jax.random.PRNGKey(0), latents=latents, mesh=mesh, **kw)
    np.testing.assert_allclose(np.asarray(meshed.images), single, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(sd, lora_files, tmp_path):
    from sdjax.models.unet_2d_condition import UNet2DConditionModel
    from sdjax.testing import UNET

    pipe, params = sd
    # a LoRA for another architecture: the mismatched layers and both shapes named
    other = UNet2DConditionModel.from_config(dict(UNET) | {"block_out_channels": (32, 96)})
    state = peft_state({"unet": other.param_shapes()}, "unet", ["down_blocks.1.resnets.0.conv1"])
    with pytest.raises(AdapterError, match=r"(?s)1 layers with the wrong shape.*down_blocks.1.resnets.0.conv1: the LoRA "
                                           r"makes a weight of shape \(96, 32, 3, 3\).*the layer's weight is "
                                           r"\(64, 32, 3, 3\)"):
        pipe.load_lora_weights(state, params)
    # keys that match nothing
    with pytest.raises(AdapterError, match=r"(?s)1 keys match no layer.*unet.down_blocks.7.attentions.0.proj_in"):
        pipe.load_lora_weights({"unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": np.zeros((4, 32), np.float32)},
                               params)
    # inconsistent ranks
    bad = peft_state(params, "unet", ["conv_in"])
    bad["unet.conv_in.lora_B.weight"] = np.zeros((32, 3, 1, 1), np.float32)
    with pytest.raises(AdapterError, match="1 layers whose down and up ranks differ:\n    unet.conv_in: "):
        pipe.load_lora_weights(bad, params)
    # a pickled file, refused unless allow_pickle=True
    (tmp_path / "lora.bin").write_bytes(b"not read")
    with pytest.raises(AdapterError, match=r"lora.bin is a pickle .* allow_pickle=True"):
        pipe.load_lora_weights(tmp_path / "lora.bin", params)
    # an adapter for a component this pipeline lacks (SDXL's second text encoder)
    te2 = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 32), np.float32),
           "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros((32, 4), np.float32)}
    with pytest.raises(AdapterError, match="2 keys are for text_encoder_2, which the params do not have"):
        pipe.load_lora_weights(te2, params)
    # names and scales
    loaded = pipe.load_lora_weights(lora_files["b"], params, adapter_name="b")
    assert sorted(pipe.load_lora_weights(lora_files["b"], loaded)["lora"]) == ["b", "default_0"]
    with pytest.raises(AdapterError, match="adapter name 'b' is already in use"):
        pipe.load_lora_weights(lora_files["b"], loaded, adapter_name="b")
    ids = pipe.prepare_inputs(PROMPTS)
    call = dict(num_inference_steps=1, height=SIZE, width=SIZE)
    for scale, message in (({"c": 1.0}, "no adapter named 'c' \\(loaded: 'b'\\)"),
                           ({"b": float("nan")}, "lora_scale\\['b'\\] must be finite"),
                           ({"b": "high"}, "lora_scale\\['b'\\] must be a number"),
                           ({"b": {"vae": 1.0}}, "names unknown components \\['vae'\\]"),
                           ({"b": [1.0, 2.0]}, "must be a number")):
        with pytest.raises(SdjaxError, match=message):
            pipe(ids, loaded, jax.random.PRNGKey(0), lora_scale=scale, **call)
    with pytest.raises(InputError, match="`lora_scale` is given, but params has no LoRA adapters"):
        pipe(ids, params, jax.random.PRNGKey(0), lora_scale=0.5, **call)
    with pytest.raises(InputError, match="`params\\['lora'\\]\\['x'\\]` is a dict, not a LoraAdapter"):
        pipe(ids, {**params, "lora": {"x": {}}}, jax.random.PRNGKey(0), **call)
    # an adapter loaded for another model, passed with these params
    other_adapter = load_lora(peft_state({"unet": other.param_shapes()}, "unet", ["down_blocks.1.resnets.0.conv1"]),
                              {"unet": other.param_shapes()})
    with pytest.raises(InputError, match=r"unet.down_blocks.1.resnets.0.conv1 has kernel shape \(3, 3, 32, 64\)"):
        pipe(ids, {**params, "lora": {"x": other_adapter}}, jax.random.PRNGKey(0), **call)
    with pytest.raises(AdapterError, match="fuse_lora: no adapter named 'zz'"):
        pipe.fuse_lora(loaded, adapter_names=["zz"])
    with pytest.raises(AdapterError, match="unfuse_lora: no adapter named 'b' \\(loaded: none\\)"):
        pipe.unfuse_lora(loaded, "b")


# ---------------------------------------------------------------------------------------------- SDXL (model level)
@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    pytest.importorskip("peft", reason="the LoRA references are made by PEFT: pip install peft")
    from sdjax.testing import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


def _sdxl_modules(folder):
    from sdjax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
    from sdjax.models.unet_2d_condition import UNet2DConditionModel

    unet, unet_params = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    te, te_params = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    te2, te2_params = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    return (unet, te, te2), {"unet": unet_params, "text_encoder": te_params, "text_encoder_2": te2_params}


def _sdxl_unet_inputs():
    rng = np.random.default_rng(0)
    return dict(sample=rng.standard_normal((2, 4, 16, 16)).astype(np.float32), timestep=np.array([10, 700]),
                encoder_hidden_states=rng.standard_normal((2, 7, 64)).astype(np.float32),
                text_embeds=rng.standard_normal((2, 32)).astype(np.float32),
                time_ids=np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (2, 1)))


@pytest.mark.parity
def test_sdxl_unet_lora_matches_diffusers(sdxl_folder, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, rank_pattern={"conv1": 2}),
                         adapter_name="xl")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ref.unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "xl", unet_lora_layers=get_peft_model_state_dict(
        ref.unet, adapter_name="xl"), unet_lora_adapter_metadata=ref.unet.peft_config["xl"].to_dict())
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref.load_lora_weights(str(tmp_path / "xl"), adapter_name="xl")

    (unet, _, _), params = _sdxl_modules(sdxl_folder)
    adapter = load_lora(tmp_path / "xl", params)
    assert adapter.components == ("unet",)
    x = _sdxl_unet_inputs()
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    fn = jax.jit(lambda p, s: unet.apply({"params": merge_lora(p, {"xl": adapter}, {"xl": s})["unet"]}, x["sample"],
                                         x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added))
    errs = []
    for scale in (0.0, 0.5, 1.0):
        ref.set_adapters(["xl"], [scale])
        with torch.no_grad():
            want = ref.unet(torch.from_numpy(x["sample"]), torch.from_numpy(x["timestep"]),
                            torch.from_numpy(x["encoder_hidden_states"]),
                            added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample.numpy()
        errs.append(rel_err(fn(params, scale), want))
    print(f"\n[SDXL UNet LoRA ({adapter.summary()})] rel err at scales 0, 0.5, 1: " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_sdxl_text_encoder_2_lora_matches_hand_reference(sdxl_folder, fmt):
    """CLIPTextModelWithProjection (its tower under `text_model` in both transformers versions): hand reference."""
    import torch
    import transformers

    (_, _, te2), params = _sdxl_modules(sdxl_folder)
    names = [f"encoder.layers.{i}.{m}" for i in range(TEXT_2["num_hidden_layers"]) for m in TEXT_TARGETS]
    state = {}
    for k, v in peft_state({"text_encoder_2": params["text_encoder_2"]["text_model"]}, "text_encoder_2", names,
                           seed=11, prefix="text_model.").items():
        state[k] = v
    if fmt == "kohya":
        state, alpha, metadata = to_kohya(state, alpha_of=lambda m, a: 2.0), 2.0, None
        assert next(iter(state)).startswith("lora_te2_text_model_encoder_layers_")
    else:
        alpha, metadata = 8.0, {"text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 8.0}
    adapter = load_lora(state, params, metadata=metadata)
    assert adapter.components == ("text_encoder_2",)
    assert all(k.startswith("text_model/encoder/layers_") for k in adapter.layers["text_encoder_2"])

    ref = transformers.CLIPTextModelWithProjection.from_pretrained(sdxl_folder / "text_encoder_2").eval()
    ids = np.array([[ref.config.bos_token_id, 5, 9, 13, ref.config.eos_token_id] + [0] * 4])
    base = {k: v.clone() for k, v in ref.state_dict().items()}
    fn = jax.jit(lambda p, s: te2.apply({"params": merge_lora(p, {"t": adapter}, {"t": s})["text_encoder_2"]}, ids))
    errs = []
    for scale in (0.0, 0.5, 1.0):
        sd_ = dict(base)
        for n in names:
            if fmt == "kohya":
                k = "lora_te2_text_model_" + n.replace(".", "_")
                down, up = state[f"{k}.lora_down.weight"], state[f"{k}.lora_up.weight"]
            else:
                down = state[f"text_encoder_2.text_model.{n}.lora_A.weight"]
                up = state[f"text_encoder_2.text_model.{n}.lora_B.weight"]
            sd_[f"text_model.{n}.weight"] = base[f"text_model.{n}.weight"] + scale * alpha / 4 * torch.from_numpy(up @ down)
        ref.load_state_dict(sd_)
        with torch.no_grad():
            want = ref(torch.from_numpy(ids))
        out = fn(params, scale)
        errs.append(max(rel_err(out.last_hidden_state, want.last_hidden_state.numpy()),
                        rel_err(out.text_embeds, want.text_embeds.numpy())))
    print(f"\n[SDXL text_encoder_2, {fmt}] rel err at scales 0, 0.5, 1: " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= 1e-5
    # saved by sdjax: PEFT names under `text_encoder_2.text_model.` (not doubled), loaded back the same
    from sdjax.lora import save_lora

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        save_lora(Path(d), adapter)
        from safetensors import safe_open

        with safe_open(str(Path(d) / "pytorch_lora_weights.safetensors"), framework="numpy") as f:
            assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in set(f.keys())
        jax.tree_util.tree_map(np.testing.assert_array_equal, load_lora(Path(d), params), adapter)


@pytest.mark.parity
def test_sdxl_textual_inversion_matches_diffusers(sdxl_folder, tmp_path):
    """An SDXL embedding (clip_l + clip_g) into both text encoders, as diffusers' documented two calls do."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sdjax.textual_inversion import load_textual_inversion
    from sdjax.tokenizer import load_tokenizer

    rng = np.random.default_rng(4)
    clip_l = rng.standard_normal((2, TEXT["hidden_size"])).astype(np.float32)
    clip_g = rng.standard_normal((2, TEXT_2["hidden_size"])).astype(np.float32)
    write_safetensors(tmp_path / "xl.safetensors", {"clip_l": clip_l, "clip_g": clip_g * 2})
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref.load_textual_inversion(torch.from_numpy(clip_g * 2), token="<xl>", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    prompt = ref.maybe_convert_prompt("a <xl> cat", ref.tokenizer_2)
    ids = ref.tokenizer_2(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = ref.text_encoder_2(ids, output_hidden_states=True)

    (_, _, te2), params = _sdxl_modules(sdxl_folder)
    tok2 = load_tokenizer(sdxl_folder, subfolder="tokenizer_2")
    with pytest.raises(AdapterError, match="more than one is 32 wide"):  # the tiny encoders are equally wide
        load_textual_inversion(tmp_path / "xl.safetensors", tok2, params["text_encoder_2"], token="<xl>")
    ti = load_textual_inversion(tmp_path / "xl.safetensors", tok2, params["text_encoder_2"], token="<xl>",
                                embedding_key="clip_g")
    assert ti.params["text_model"]["embeddings"]["token_embedding"]["embedding"].shape[0] == ti.vocab_size
    ours_ids = tok2(prompt, padding="max_length", max_length=77, return_tensors="np").input_ids
    np.testing.assert_array_equal(ours_ids, ids.numpy())
    out = te2.clone(vocab_size=ti.vocab_size).apply({"params": ti.params}, ours_ids)
    err = max(rel_err(out.last_hidden_state, want.last_hidden_state.numpy()),
              rel_err(out.text_embeds, want.text_embeds.numpy()))
    print(f"\n[SDXL textual inversion, text_encoder_2] rel err {err:.1e}")
    assert err <= 1e-5


def test_pipeline_wiring_over_sdxl_components(sdxl_folder, tmp_path):
    """load_lora_weights / set_adapters / load_textual_inversion over unet + text_encoder + text_encoder_2, and the
    merge inside engine.run_jit, on a minimal pipeline with SDXL's components (the SDXL pipeline is not in sdjax yet)."""
    from sdjax.pipelines.base import DiffusionPipeline
    from sdjax.pipelines.engine import Settings
    from sdjax.tokenizer import load_tokenizer

    (unet, te, te2), params = _sdxl_modules(sdxl_folder)

    class Parts(DiffusionPipeline):
        components = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        dtype = jnp.float32

        def __init__(self, unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
            self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2
            self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

        @classmethod
        def from_pipe(cls, pipe, **changes):
            parts = {c: getattr(pipe, c) for c in cls.components} | changes
            return cls(**parts)

        def generate(self, settings, inputs, params, key):
            h1 = self.text_encoder.apply({"params": params["text_encoder"]}, inputs["ids"]).last_hidden_state
            o2 = self.text_encoder_2.apply({"params": params["text_encoder_2"]}, inputs["ids_2"])
            context = jnp.concatenate([h1, o2.last_hidden_state], -1)
            added = {"text_embeds": o2.text_embeds, "time_ids": jnp.tile(jnp.asarray([[32.0] * 6]), (2, 1))}
            return self.unet.apply({"params": params["unet"]}, inputs["sample"], jnp.array([10, 700]), context,
                                   added_cond_kwargs=added)

    pipe = Parts(unet, te, te2, load_tokenizer(sdxl_folder, "tokenizer"), load_tokenizer(sdxl_folder, "tokenizer_2"))
    te_names = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]
    state = peft_state({"unet": params["unet"]}, "unet", ["conv_in", "down_blocks.1.attentions.0.proj_in"], seed=1)
    state |= to_kohya(peft_state({"text_encoder_2": params["text_encoder_2"]["text_model"]}, "text_encoder_2",
                                 te_names, seed=2, prefix="text_model."), alpha_of=lambda m, a: 2.0)
    state |= to_kohya(peft_state(params, "text_encoder", te_names, seed=3, prefix="text_model."))
    with_lora = pipe.load_lora_weights(state, params, adapter_name="all")
    assert with_lora["lora"]["all"].components == ("unet", "text_encoder_2", "text_encoder")
    ids = np.asarray(pipe.tokenizer(["a cat", "a dog"], padding="max_length", max_length=77).input_ids, np.int32)
    inputs = {"ids": ids, "ids_2": ids, "sample": np.ones((2, 4, 16, 16), np.float32)}
    settings = Settings(num_inference_steps=1, height=32, width=32)
    run = lambda p: np.asarray(run_jit(pipe, settings, inputs, pipe.adapter_call_params(p), jax.random.PRNGKey(0)))
    pipe.check_params(with_lora)
    direct = merge_lora(params, {"all": with_lora["lora"]["all"]}, {"all": {"unet": 0.5, "text_encoder_2": -1.0}})
    got = run(pipe.set_adapters(with_lora, "all", {"unet": 0.5, "text_encoder_2": -1.0}))
    np.testing.assert_allclose(got, run(direct), atol=1e-5)
    assert np.abs(got - run(params)).max() > 1e-3
    # textual inversion into both text encoders from one SDXL file
    write_safetensors(tmp_path / "xl.safetensors", {"clip_l": np.ones((1, 32), np.float32),
                                                    "clip_g": np.full((1, 32), 2.0, np.float32)})
    pipe2, params2 = pipe.load_textual_inversion(tmp_path / "xl.safetensors", params, token="<xl>")
    for c, tok, value in (("text_encoder", "tokenizer", 1.0), ("text_encoder_2", "tokenizer_2", 2.0)):
        i = getattr(pipe2, tok).convert_tokens_to_ids("<xl>")
        assert getattr(pipe2, c).vocab_size == i + 1 == len(getattr(pipe, tok)) + 1
        table = convert.flat_params(params2[c])
        emb = next(v for p, v in table.items() if p[-2:] == ("token_embedding", "embedding"))
        np.testing.assert_array_equal(emb[i], np.full(32, value))
    assert isinstance(with_lora["lora"]["all"], LoraAdapter)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_lora_and_embedding_flags(sd, tiny_folder, lora_files, tmp_path, capsys):
    """`sdjax generate --lora PATH:SCALE --lora PATH --embedding PATH`: the images the API gives, recorded in
    settings.json; a missing or unfitting LoRA is one line and exit 2."""
    import json

    from PIL import Image

    from sdjax.cli import main
    from sdjax.cli.generate import embedding_arg, lora_arg
    from sdjax.seeds import initial_noise, loop_key

    assert lora_arg("x/a.safetensors:0.5") == ("x/a.safetensors", 0.5)
    assert lora_arg("x/a.safetensors") == ("x/a.safetensors", 1.0)
    assert lora_arg("hub/repo:-1") == ("hub/repo", -1.0)
    assert embedding_arg("e.safetensors:<tok>") == ("e.safetensors", "<tok>")
    assert embedding_arg("e.safetensors") == ("e.safetensors", None)
    write_safetensors(tmp_path / "toy.safetensors", {"<toy>": np.full((1, TEXT["hidden_size"]), 0.3, np.float32)})
    argv = ["generate", "--model", tiny_folder, "--prompt", "a <toy> circle", "--steps", "2", "--height", "32",
            "--width", "32", "--lora", f"{lora_files['a']}:0.5", "--lora", lora_files["b"],
            "--embedding", tmp_path / "toy.safetensors", "--out", tmp_path / "out"]
    # the command in its own process, as users run it (in this process, after ~70% of the suite, XLA's compile of
    # the API call below crashed twice: see the stop's notes)
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sdjax.cli", *[str(a) for a in argv]], capture_output=True, text=True,
                       env=dict(__import__("os").environ, XLA_FLAGS=""))
    assert r.returncode == 0, r.stderr[-2000:]
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert [x["scale"] for x in settings["loras"]] == [0.5, 1.0] and settings["embeddings"][0]["token"] is None
    got = np.asarray(Image.open(tmp_path / "out" / "image-000.png"), np.float32) / 255

    pipe, params = sd
    params = pipe.load_lora_weights(lora_files["a"], params, adapter_name="x")
    params = pipe.load_lora_weights(lora_files["b"], params, adapter_name="y")
    pipe2, params = pipe.load_textual_inversion(tmp_path / "toy.safetensors", params)
    want = pipe2(pipe2.prepare_inputs(["a <toy> circle"]), params, loop_key(0), num_inference_steps=2,
                 guidance_scale=7.5, height=32, width=32, latents=initial_noise([0], pipe.latent_shape(1, 32, 32)[1:]),
                 neg_prompt_ids=pipe2.prepare_inputs([""]), return_trajectory=False, lora_scale={"x": 0.5}).images
    assert np.abs(got - np.asarray(want[0])).max() <= 1 / 255 + 1e-6

    for extra, expect in (([f"{tmp_path / 'nope'}:0.5"], "LoRA file not found"),
                          ([tmp_path / "toy.safetensors"], "keys match no layer")):
        bad = argv[:-6] + ["--lora", *extra, "--out", tmp_path / "bad"]
        assert main([str(a) for a in bad]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("loading ")]
        assert len(err) == 1 and "sdjax generate: error:" in err[0] and expect in err[0], err
