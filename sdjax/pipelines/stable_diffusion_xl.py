"""Stable Diffusion XL on the one engine: the base (text -> image) and the refiner (image -> image), with the
trajectory and x̂0 at every step, in diffusers' Flax calling style.

    pipe, params = FlaxStableDiffusionXLPipeline.from_pretrained(base_path, dtype=jnp.bfloat16)
    prompt_ids = pipe.prepare_inputs(["a photo of a cat"])            # int32 [B, 2, 77]: tokenizer, tokenizer_2
    out = pipe(prompt_ids, params, key, num_inference_steps=40, guidance_scale=5.0,
               original_size=(1024, 1024), target_size=(1024, 1024), guidance_rescale=0.7)

    # "ensemble of experts": the base runs the first 80% of the schedule, the refiner the rest
    refiner, rparams = FlaxStableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_path, dtype=jnp.bfloat16)
    latents = pipe(prompt_ids, params, key, denoising_end=0.8, output_type="latent").images
    out = refiner(refiner.prepare_inputs(["a photo of a cat"]), latents, rparams, key, denoising_start=0.8)

What SDXL adds to Stable Diffusion, and where it lives here (the loop is `engine.denoise`, as for SD):
* two text encoders (`text_context`): the penultimate hidden states of text_encoder (CLIPTextModel) and
  text_encoder_2 (CLIPTextModelWithProjection) concatenated on the feature axis, and text_encoder_2's projected
  pooled state (`text_embeds`). The refiner has text_encoder_2 only. `prepare_inputs` returns the ids of every
  tokenizer as one int32 array [B, E, 77] (E = 2 for the base, 1 for the refiner; row k is tokenizer k's ids).
  `force_zeros_for_empty_prompt` (model_index.json): without neg_prompt_ids the unconditional embeddings are
  zeros, as diffusers does without a negative prompt.
* micro-conditioning (`condition` -> the UNet's added_cond_kwargs): time ids (original size, crop top-left,
  target size; the refiner's aesthetic score instead of the target size) built on the host from the call's
  tuples, passed traced: other values never recompile. Negative variants as diffusers uses them.
* guidance_rescale (`guidance.rescale_noise_cfg`, traced).
* denoising_end / denoising_start (`Conditioning.end` / `start`): the first model call not run / the first run,
  from diffusers' discrete timestep cutoff round(T - fraction x T); traced, so another fraction never recompiles.
  The trajectory holds the steps run. output_type="latent" skips the VAE (what the refiner takes as `image`).
* the VAE in float32 when its config says force_upcast and the pipeline's dtype is not float32 (SDXL's VAE
  overflows in float16: diffusers issue 7765): from_pretrained loads it in float32, and decode/encode cast
  their params and inputs to float32 in the program. (diffusers upcasts only float16; here bfloat16 too.)
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..errors import ConfigError, InputError, SdjaxError
from ..io import read_json, write_json
from ..models.autoencoder_kl import AutoencoderKL
from ..models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from ..models.unet_2d_condition import UNet2DConditionModel
from ..schedulers import get_scheduler, load_scheduler_config
from ..tokenizer import load_tokenizer
from .base import check_components, open_pipeline_folder, runtime_for, weight_patterns
from .engine import Conditioning, Settings
from .image_to_image import FlaxStableDiffusionImg2ImgPipeline, ImageSettings
from .loading import check_pipeline_class
from .stable_diffusion import FlaxStableDiffusionPipeline

OUTPUT_TYPES = ("images", "latent")
# diffusers' defaults for the refiner's aesthetic score conditioning
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


@flax.struct.dataclass
class SDXLTextEmbeddings:
    """What SDXL's UNet reads from the text ([uncond; cond] halves stacked on the batch axis)."""

    hidden_states: jax.Array  # [2B, L, D_1 + D_2]: every encoder's penultimate hidden states, concatenated
    text_embeds: jax.Array    # [2B, P]: text_encoder_2's projection of its pooled (EOS) state


@dataclasses.dataclass(frozen=True)
class XLSettings(Settings):
    output_latents: bool = False  # output_type="latent": the final latents instead of decoded images


@dataclasses.dataclass(frozen=True)
class XLImageSettings(ImageSettings):
    output_latents: bool = False


def _prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise SdjaxError(f"`{name}` has to be a string or a list of strings, got {type(prompt).__name__}")
    return list(prompt)


def _tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
    """int32 [B, max_length] padded ids; longer prompts truncated with a warning naming what was cut."""
    max_len = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="np").input_ids
    for p, full in zip(prompts, tokenizer(prompts, padding=False, truncation=False).input_ids):
        if len(full) > max_len:
            removed = tokenizer.decode(full[max_len - 1:-1])
            warnings.warn(f"prompt is longer than the text encoder's {max_len} tokens and was truncated; "
                          f"removed: {removed!r} (from prompt {p[:60]!r}...)", stacklevel=3)
    return ids.astype(np.int32)


def _listed(index: dict, name: str) -> bool:
    v = index.get(name)
    return isinstance(v, list) and len(v) == 2 and v[0] is not None


def _cut_end(traj, end: int, axis: int):
    """The trajectory up to model call `end` (not included): the sample before each call run and after the last."""
    cut = lambda x, n: None if x is None else jax.lax.slice_in_dim(x, 0, n, axis=axis)  # noqa: E731
    return traj.replace(latents=cut(traj.latents, end + 1), pred_original_samples=cut(traj.pred_original_samples, end),
                        timesteps=cut(traj.timesteps, end), noise_levels=cut(traj.noise_levels, end),
                        attention_maps=cut(traj.attention_maps, end))


class StableDiffusionXLMixin:
    """What both SDXL pipelines add to their Stable Diffusion counterparts (text, micro-conditioning, the VAE's
    dtype, denoising_start/end, loading). Listed first in the bases: its hooks override the SD ones."""

    family: ClassVar[str] = "sdxl"  # sdjax.pipelines.loading: which folders this class runs
    components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    diffusers_class: ClassVar[str] = ""
    #: the time ids text2img builds its negative ones with: "text2img" (diffusers' StableDiffusionXLPipeline)
    #: or "img2img" (StableDiffusionXLImg2ImgPipeline); they differ in diffusers, and sdjax follows each.
    negative_rule: ClassVar[str] = "text2img"
    default_guidance_scale: ClassVar[float] = 5.0

    def __init__(self, text_encoder: CLIPTextModel | None, text_encoder_2: CLIPTextModelWithProjection,
                 vae: AutoencoderKL, unet: UNet2DConditionModel, tokenizer, tokenizer_2, scheduler, dtype=jnp.float32,
                 scheduler_base_config: dict | None = None, force_zeros_for_empty_prompt: bool = True,
                 requires_aesthetics_score: bool = False):
        self.vae_upcast = bool(vae.force_upcast) and jnp.dtype(dtype) != jnp.float32
        if self.vae_upcast and jnp.dtype(vae.dtype) != jnp.float32:
            vae = vae.clone(dtype=jnp.float32)
        super().__init__(text_encoder, vae, unet, tokenizer, scheduler, dtype=dtype,
                         scheduler_base_config=scheduler_base_config)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        for name, value in (("force_zeros_for_empty_prompt", force_zeros_for_empty_prompt),
                            ("requires_aesthetics_score", requires_aesthetics_score)):
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"{type(self).__name__}: {name} must be true or false, got {value!r}")
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        self._check_modules()

    def _check_modules(self) -> None:
        name = type(self).__name__
        if not isinstance(self.text_encoder_2, CLIPTextModelWithProjection) or self.tokenizer_2 is None:
            raise ConfigError(f"{name} needs text_encoder_2 (a CLIPTextModelWithProjection, SDXL's pooled text "
                              f"embedding) and tokenizer_2")
        if (self.text_encoder is None) != (self.tokenizer is None):
            raise ConfigError(f"{name}: text_encoder and tokenizer go together (the refiner has neither)")
        if self.unet.addition_embed_type != "text_time":
            raise ConfigError(f"{name}: the UNet's addition_embed_type is {self.unet.addition_embed_type!r}; SDXL's "
                              "is 'text_time' (a Stable Diffusion 1.x/2.x UNet? use FlaxStableDiffusionPipeline)")
        widths = [enc.hidden_size for _, enc, _ in self._encoders()]
        if self.unet._cross_dims()[0] != sum(widths):
            raise ConfigError(f"{name}: the UNet's cross_attention_dim is {self.unet.cross_attention_dim}, the text "
                              f"encoders give {' + '.join(map(str, widths))} = {sum(widths)}")
        n_ids = self.num_time_ids
        passed = self.unet.addition_time_embed_dim * n_ids + self.text_encoder_2.projection_dim
        expected = self.unet.projection_class_embeddings_input_dim
        if passed != expected:
            step = self.unet.addition_time_embed_dim
            hint = ("the UNet is conditioned on an aesthetic score: requires_aesthetics_score=True (the refiner's "
                    "model_index.json has it)" if expected - passed == -step and not self.requires_aesthetics_score
                    else "the UNet is conditioned on the target size: requires_aesthetics_score=False"
                    if expected - passed == step and self.requires_aesthetics_score
                    else "check the UNet's addition_time_embed_dim and text_encoder_2's projection_dim")
            raise ConfigError(f"{name}: the UNet's add_embedding takes {expected} inputs, but {n_ids} time ids x "
                              f"{step} + text_encoder_2's projection_dim {self.text_encoder_2.projection_dim} = "
                              f"{passed}: {hint}")
        lengths = {tok.model_max_length for _, _, tok in self._encoders()}
        if len(lengths) != 1:
            raise ConfigError(f"{name}: the tokenizers' model_max_length differ ({sorted(lengths)}); the ids of both "
                              "share one array")
        if lengths.pop() > min(enc.max_position_embeddings for _, enc, _ in self._encoders()):
            raise ConfigError(f"{name}: the tokenizers pad to more tokens than a text encoder has positions")

    # ------------------------------------------------------------------ identity
    def _identity(self) -> tuple:
        return super()._identity() + (self.force_zeros_for_empty_prompt, self.requires_aesthetics_score)

    def param_components(self) -> tuple[str, ...]:
        return tuple(c for c in super().param_components() if getattr(self, c) is not None)

    def _encoders(self) -> list[tuple[str, object, object]]:
        """(params name, module, tokenizer) of every text encoder, in the order of the ids' tokenizer axis."""
        pairs = [("text_encoder", self.text_encoder, self.tokenizer),
                 ("text_encoder_2", self.text_encoder_2, self.tokenizer_2)]
        return [p for p in pairs if p[1] is not None]

    @property
    def num_time_ids(self) -> int:
        """6 (original size, crop top-left, target size) or, with requires_aesthetics_score, 5 (the score
        instead of the target size)."""
        return 5 if self.requires_aesthetics_score else 6

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype=jnp.float32, scheduler=None, param_dtype=None,
                        allow_pickle: bool = False, revision: str | None = None, abstract: bool = False,
                        vae_encoder: bool = True, **runtime):
        """Load a diffusers SDXL folder (base or refiner) or hub repo id: returns (pipeline, params).

        params: {"text_encoder" (not the refiner), "text_encoder_2", "vae", "unet"}. Every weight is read one
        tensor at a time and put in `param_dtype` (default: dtype) as it is read; the VAE stays float32 when it
        says force_upcast and dtype is not float32. Other arguments (abstract=, vae_encoder=) as
        FlaxStableDiffusionPipeline.from_pretrained."""
        root, index = open_pipeline_folder(pretrained_model_name_or_path, weight_patterns(cls.components),
                                           revision=revision)
        index_path = root / "model_index.json"
        check_pipeline_class(index, index_path, cls)
        check_components(index, index_path, cls.components, cls.__name__)
        needed = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
        missing = [c for c in needed if not _listed(index, c)]
        if missing:
            raise ConfigError(f"{index_path}: an SDXL pipeline needs {', '.join(needed)}; model_index.json has no "
                              f"{', '.join(missing)} (text_encoder_2 is SDXL's CLIPTextModelWithProjection, "
                              "tokenizer_2 its tokenizer)")
        if _listed(index, "text_encoder") != _listed(index, "tokenizer"):
            raise ConfigError(f"{index_path}: text_encoder and tokenizer go together (the refiner has neither)")
        present = [c for c in cls.components if _listed(index, c)]
        absent = [c for c in present if not (root / c).is_dir()]
        if absent:
            raise ConfigError(f"{root}: model_index.json lists {', '.join(absent)}, but the folder has no "
                              f"{', '.join(c + '/' for c in absent)} (an incomplete download or copy?)")
        flags = {}
        for key, default in (("force_zeros_for_empty_prompt", True), ("requires_aesthetics_score", False)):
            flags[key] = index.get(key, default)
            if not isinstance(flags[key], bool):
                raise ConfigError(f"{index_path}: {key} must be true or false, got {flags[key]!r}")

        kw = dict(dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle, abstract=abstract)
        text_encoder = te_params = None
        if _listed(index, "text_encoder"):
            text_encoder, te_params = CLIPTextModel.from_pretrained(
                root, subfolder="text_encoder", **kw, **runtime_for(CLIPTextModel, runtime))
        text_encoder_2, te2_params = CLIPTextModelWithProjection.from_pretrained(
            root, subfolder="text_encoder_2", **kw, **runtime_for(CLIPTextModelWithProjection, runtime))
        vae_kw = kw
        if jnp.dtype(dtype) != jnp.float32 and _vae_force_upcast(root / "vae" / "config.json"):
            vae_kw = dict(kw, dtype=jnp.float32, param_dtype=jnp.float32)
        vae, vae_params = AutoencoderKL.from_pretrained(root, subfolder="vae", skip=cls.vae_skip(vae_encoder), **vae_kw,
                                                        **runtime_for(AutoencoderKL, runtime))
        unet, unet_params = UNet2DConditionModel.from_pretrained(
            root, subfolder="unet", **kw, **runtime_for(UNet2DConditionModel, runtime))
        tokenizer = load_tokenizer(root, subfolder="tokenizer") if text_encoder is not None else None
        tokenizer_2 = load_tokenizer(root, subfolder="tokenizer_2")
        folder_config = load_scheduler_config(root, subfolder="scheduler")
        sched = get_scheduler(folder_config if scheduler is None else scheduler, base_config=folder_config)
        pipe = cls(text_encoder, text_encoder_2, vae, unet, tokenizer, tokenizer_2, sched, dtype=dtype,
                   scheduler_base_config=folder_config, **flags)
        params = {"text_encoder_2": te2_params, "vae": vae_params, "unet": unet_params}
        if te_params is not None:
            params["text_encoder"] = te_params
        return pipe, params

    @classmethod
    def from_pipe(cls, pipe, **changes):
        """A pipeline of this class over another SDXL pipeline's modules (diffusers' `from_pipe`): nothing is
        reloaded, the same params serve both. `changes` replace components (e.g. scheduler=...)."""
        if getattr(pipe, "family", "sd") != "sdxl":
            raise ConfigError(f"{cls.__name__}.from_pipe needs an SDXL pipeline, got {type(pipe).__name__} (one text "
                              "encoder, no micro-conditioning)")
        parts = dict(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, vae=pipe.vae, unet=pipe.unet,
                     tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, scheduler=pipe.scheduler, dtype=pipe.dtype,
                     scheduler_base_config=pipe.scheduler_base_config,
                     force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt,
                     requires_aesthetics_score=pipe.requires_aesthetics_score)
        parts.update(changes)
        if isinstance(parts["scheduler"], (str, dict)):
            parts["scheduler"] = get_scheduler(parts["scheduler"], base_config=parts["scheduler_base_config"])
        return cls(**parts)

    def save_pretrained(self, save_directory, params) -> None:
        """Write a diffusers-format SDXL folder that diffusers' PyTorch pipeline (and sdjax) loads."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": self.diffusers_class, "_diffusers_version": "0.35.0",
                 "feature_extractor": [None, None], "image_encoder": [None, None],
                 "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}
        if self.diffusers_class == "StableDiffusionXLImg2ImgPipeline":
            index["requires_aesthetics_score"] = self.requires_aesthetics_score
        for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
            module = getattr(self, name)
            if module is not None:
                module.save_pretrained(root / name, params[name])
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(self, name) is not None:
                getattr(self, name).save_pretrained(root / name)
        self.scheduler.save_pretrained(root / "scheduler")
        index.update({
            "scheduler": ["diffusers", self.scheduler.diffusers_class],
            "text_encoder": ["transformers", "CLIPTextModel"] if self.text_encoder is not None else [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"] if self.tokenizer is not None else [None, None],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
        write_json(root / "model_index.json", index)

    # ------------------------------------------------------------------ inputs
    def tokenize(self, prompt, prompt_2=None) -> np.ndarray:
        """int32 [B, E, 77]: row k holds tokenizer k's ids (E = 2: tokenizer, tokenizer_2; the refiner E = 1).
        prompt_2 (for tokenizer_2 / text_encoder_2) defaults to prompt, as in diffusers."""
        prompts = _prompt_list(prompt, "prompt")
        encoders = self._encoders()
        if prompt_2 is not None and len(encoders) == 1:
            raise InputError("`prompt_2` is the prompt of text_encoder_2 next to text_encoder; this pipeline has "
                             "text_encoder_2 only, which reads `prompt`")
        prompts_2 = prompts if prompt_2 is None else _prompt_list(prompt_2, "prompt_2")
        if len(prompts_2) != len(prompts):
            raise InputError(f"`prompt_2` has {len(prompts_2)} prompts, `prompt` {len(prompts)}")
        texts = [prompts, prompts_2][:len(encoders)]
        return np.stack([_tokenize(tok, t) for (_, _, tok), t in zip(encoders, texts)], axis=1)

    def unconditional_ids(self, batch: int) -> np.ndarray:
        return np.tile(self.tokenize([""]), (batch, 1, 1))

    def prompt_batch_shape(self, prompt_ids) -> tuple:
        return tuple(np.shape(prompt_ids)[:-2])

    def check_token_ids(self, ids, name: str, jit: bool, like=None):
        """int token ids [B, E, L] ([n_dev, per_dev, E, L] with jit=True), one row per tokenizer."""
        arr = np.asarray(ids)
        encoders = self._encoders()
        e, want = len(encoders), 4 if jit else 3
        length = encoders[0][2].model_max_length
        rows = " and ".join(tok_name for tok_name in ("tokenizer", "tokenizer_2")[2 - e:])
        form = f"[n_devices, per_device, {e}, {length}]" if jit else f"[batch, {e}, {length}]"
        if arr.dtype.kind not in "iu" or arr.ndim != want or arr.shape[-2] != e:
            raise InputError(f"`{name}` must be {form} int token ids, a row for each of {rows} "
                             f"(pipe.prepare_inputs{', then shard' if jit else ''}), got {arr.dtype} of shape "
                             f"{tuple(arr.shape)}")
        if like is not None and arr.shape != np.shape(like):
            raise InputError(f"`{name}` has shape {tuple(arr.shape)}, but prompt_ids has {tuple(np.shape(like))}")
        positions = min(enc.max_position_embeddings for _, enc, _ in encoders)
        if arr.shape[-1] > positions:
            raise InputError(f"`{name}` has {arr.shape[-1]} tokens per prompt; the text encoders take at most "
                             f"{positions}")
        for k, (enc_name, enc, _) in enumerate(encoders):
            row = arr[..., k, :]
            if row.size and (row.min() < 0 or row.max() >= enc.vocab_size):
                bad = row.max() if row.max() >= enc.vocab_size else row.min()
                raise InputError(f"`{name}` holds token id {int(bad)} in row {k} ({enc_name}), outside its "
                                 f"vocabulary [0, {enc.vocab_size})")
        return jnp.asarray(arr, jnp.int32)

    def text_inputs(self, prompt_ids, neg_prompt_ids, guidance_scale, jit: bool, mesh) -> dict:
        inputs = super().text_inputs(prompt_ids, neg_prompt_ids, guidance_scale, jit, mesh)
        if neg_prompt_ids is None and self.force_zeros_for_empty_prompt:
            inputs["neg_prompt_ids"] = None  # text_context: zero embeddings, as diffusers without a negative prompt
        return inputs

    def _pair(self, value, name: str, batch_shape: tuple, positive: bool) -> np.ndarray:
        """A pair of numbers for every prompt, or one pair per prompt -> float32 [*batch, 2]."""
        what = "(height, width)" if positive else "(top, left)"
        try:
            if isinstance(value, (str, bytes)) or any(isinstance(v, (bool, str)) for v in np.ravel(
                    np.asarray(value, dtype=object))):
                raise TypeError
            arr = np.asarray(value, np.float64)
        except (TypeError, ValueError):
            raise InputError(f"`{name}` must be a pair of numbers {what}, or one pair per prompt, got "
                             f"{value!r}") from None
        if arr.shape != (2,) and arr.shape != tuple(batch_shape) + (2,):
            raise InputError(f"`{name}` must be a pair {what} or one pair per prompt {tuple(batch_shape) + (2,)}, "
                             f"got shape {arr.shape}: {value!r}")
        if not np.all(np.isfinite(arr)) or (np.any(arr <= 0) if positive else np.any(arr < 0)):
            raise InputError(f"`{name}` must hold finite numbers {'> 0' if positive else '>= 0'}, got {value!r}")
        return np.broadcast_to(arr, tuple(batch_shape) + (2,)).astype(np.float32)

    def _score(self, value, name: str, batch_shape: tuple) -> np.ndarray:
        try:
            if isinstance(value, (bool, str)):
                raise TypeError
            arr = np.asarray(value, np.float64)
            out = np.broadcast_to(arr, tuple(batch_shape)) if arr.ndim <= 1 else None
        except (TypeError, ValueError):
            out = None
        if out is None or not np.all(np.isfinite(out)):
            raise InputError(f"`{name}` must be a finite number or one per prompt {tuple(batch_shape)}, got {value!r}")
        return out.astype(np.float32)[..., None]

    def time_ids(self, batch_shape: tuple, height: int, width: int, original_size=None, crops_coords_top_left=None,
                 target_size=None, negative_original_size=None, negative_crops_coords_top_left=None,
                 negative_target_size=None, aesthetic_score=None, negative_aesthetic_score=None):
        """(time ids, negative time ids), float32 [*batch, n]: diffusers' `_get_add_time_ids`.

        Defaults as diffusers: original and target size (height, width), crop (0, 0), aesthetic score 6.0 and
        2.5. Negative ones: the base (StableDiffusionXLPipeline) uses its own only when negative_original_size and
        negative_target_size are both given (else the positive ids); the image-to-image pipeline defaults each to
        its positive one, and without the aesthetic score uses the positive crop. An argument diffusers would
        ignore is refused here, so that no value is dropped silently.

        Every prompt's unconditional half gets the negative ids and its conditional half the positive ones. (diffusers'
        StableDiffusionXLPipeline builds cat([negative, positive]).repeat(batch), which at batch > 1 with negative
        ids that differ from the positive ones gives rows 1..B-1 of each half the other half's ids; its img2img
        pipeline, and sdjax, repeat first. With the default negative ids, or one prompt, the two agree.)"""
        pair = lambda v, name, pos: self._pair(v, name, batch_shape, pos)  # noqa: E731
        size = (height, width)
        given = {k for k, v in dict(target_size=target_size, negative_target_size=negative_target_size,
                                    aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                                    negative_crops_coords_top_left=negative_crops_coords_top_left,
                                    negative_original_size=negative_original_size).items() if v is not None}
        orig = pair(original_size if original_size is not None else size, "original_size", True)
        crops = pair(crops_coords_top_left if crops_coords_top_left is not None else (0, 0), "crops_coords_top_left",
                     False)
        if self.requires_aesthetics_score:
            unused = given & {"target_size", "negative_target_size"}
            if unused:
                raise InputError(f"{', '.join(sorted(unused))}: this UNet is conditioned on an aesthetic score instead "
                                 "of the target size (requires_aesthetics_score); use aesthetic_score / "
                                 "negative_aesthetic_score")
            neg_orig = pair(negative_original_size, "negative_original_size", True) \
                if negative_original_size is not None else orig
            neg_crops = pair(negative_crops_coords_top_left if negative_crops_coords_top_left is not None else (0, 0),
                             "negative_crops_coords_top_left", False)
            score = self._score(AESTHETIC_SCORE if aesthetic_score is None else aesthetic_score, "aesthetic_score",
                                batch_shape)
            neg_score = self._score(NEGATIVE_AESTHETIC_SCORE if negative_aesthetic_score is None
                                    else negative_aesthetic_score, "negative_aesthetic_score", batch_shape)
            return (np.concatenate([orig, crops, score], -1), np.concatenate([neg_orig, neg_crops, neg_score], -1))
        unused = given & {"aesthetic_score", "negative_aesthetic_score"}
        if unused:
            raise InputError(f"{', '.join(sorted(unused))}: this UNet is conditioned on the target size, not an "
                             "aesthetic score (requires_aesthetics_score is false: SDXL's base)")
        target = pair(target_size if target_size is not None else size, "target_size", True)
        positive = np.concatenate([orig, crops, target], -1)
        if self.negative_rule == "img2img":
            if negative_crops_coords_top_left is not None:
                raise InputError("negative_crops_coords_top_left: without the aesthetic score the image-to-image "
                                 "pipeline uses crops_coords_top_left for the negative ids too (as diffusers)")
            neg_orig = pair(negative_original_size, "negative_original_size", True) \
                if negative_original_size is not None else orig
            neg_target = pair(negative_target_size, "negative_target_size", True) \
                if negative_target_size is not None else target
            return positive, np.concatenate([neg_orig, crops, neg_target], -1)
        negatives = given & {"negative_original_size", "negative_target_size", "negative_crops_coords_top_left"}
        if not negatives:
            return positive, positive
        if not {"negative_original_size", "negative_target_size"} <= negatives:
            raise InputError(f"{', '.join(sorted(negatives))}: diffusers' StableDiffusionXLPipeline uses negative "
                             "micro-conditioning only when negative_original_size and negative_target_size are both "
                             "given (negative_crops_coords_top_left defaults to (0, 0)); give both")
        neg = np.concatenate([pair(negative_original_size, "negative_original_size", True),
                              pair(negative_crops_coords_top_left if negative_crops_coords_top_left is not None
                                   else (0, 0), "negative_crops_coords_top_left", False),
                              pair(negative_target_size, "negative_target_size", True)], -1)
        return positive, neg

    def default_time_ids(self, batch: int, height: int, width: int):
        """[negative; positive] time ids [2 * batch, n] of a call with diffusers' default micro-conditioning."""
        pos, neg = self.time_ids((batch,), height, width)
        return jnp.asarray(np.concatenate([neg, pos]))

    def denoising_range(self, num_inference_steps: int, denoising_start=None, denoising_end=None, start: int = 0):
        """(first model call, first call not run) for denoising_start / denoising_end (None where not given), from
        diffusers' discrete timestep cutoff round(T - fraction x T) (T: num_train_timesteps) on this scheduler's
        timesteps: the calls at timesteps >= the end cutoff run, and from the first below the start cutoff (a
        second-order method starts on a whole step, as diffusers)."""
        for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (float, int, np.floating, np.integer))
                                  or not 0 < float(v) < 1):
                raise InputError(f"`{name}` must be a fraction of the schedule in (0, 1), got {v!r}")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise InputError(f"`denoising_start` ({denoising_start}) must be smaller than `denoising_end` "
                             f"({denoising_end})")
        if denoising_start is None and denoising_end is None:
            return None, None
        timesteps = np.asarray(self.scheduler.set_timesteps(num_inference_steps, (1, 1, 1, 1)).timesteps)
        total = self.scheduler.num_train_timesteps
        first = last = None
        if denoising_start is not None:
            cutoff = int(round(total - float(denoising_start) * total))
            n = int(np.sum(timesteps < cutoff))
            if self.scheduler.order == 2 and n % 2 == 0:
                n += 1  # diffusers: end a second-order method on its second (derivative) call
            first = len(timesteps) - n
            if n == 0 or first >= len(timesteps):
                raise InputError(f"`denoising_start` = {denoising_start} leaves no step of {num_inference_steps} to run "
                                 f"(no timestep below {cutoff}): use a smaller denoising_start or more steps")
            self.scheduler.check_start(first)
        begin = start if first is None else first
        if denoising_end is not None:
            cutoff = int(round(total - float(denoising_end) * total))
            last = begin + int(np.sum(timesteps[begin:] >= cutoff))
            if last <= begin:
                raise InputError(f"`denoising_end` = {denoising_end} runs no step of {num_inference_steps} (no timestep "
                                 f"at or above {cutoff} is left): use a larger denoising_end or more steps")
        return first, last

    def add_sdxl_inputs(self, inputs: dict, batch_shape: tuple, height: int, width: int, guidance_rescale,
                        micro: dict, end: int | None) -> None:
        """Time ids, guidance_rescale and the end (all traced) into a call's inputs."""
        inputs["guidance_rescale"] = self.check_guidance(guidance_rescale, batch_shape, "guidance_rescale")
        pos, neg = self.time_ids(batch_shape, height, width, **micro)
        inputs["time_ids"], inputs["negative_time_ids"] = jnp.asarray(pos), jnp.asarray(neg)
        if end is not None:
            inputs["end"] = jnp.full(batch_shape, end, jnp.int32)

    @staticmethod
    def check_output_type(output_type) -> bool:
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"`output_type` must be one of {', '.join(OUTPUT_TYPES)} (latent: the final latents, "
                             f"not decoded, e.g. for the refiner), got {output_type!r}")
        return output_type == "latent"

    def finish(self, outputs, params, jit: bool, start: int = 0, decode_trajectory: bool = False,
               check_finite: bool = True, end: int | None = None):
        images, traj, diagnostics = outputs
        if traj is not None and end is not None:
            traj = _cut_end(traj, end, axis=1 if jit else 0)
        return super().finish((images, traj, diagnostics), params, jit, start=start,
                              decode_trajectory=decode_trajectory, check_finite=check_finite)

    # ------------------------------------------------------------------ the computation (traced)
    def encode_prompt(self, params, prompt_ids) -> SDXLTextEmbeddings:
        """ids [B, E, L] -> every encoder's penultimate hidden states (concatenated) and text_encoder_2's text_embeds."""
        hidden = []
        for k, (name, enc, _) in enumerate(self._encoders()):
            out = enc.apply({"params": params[name]}, prompt_ids[:, k], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return SDXLTextEmbeddings(hidden_states=jnp.concatenate(hidden, axis=-1), text_embeds=out.text_embeds)

    def text_context(self, params, prompt_ids, neg_prompt_ids) -> SDXLTextEmbeddings:
        """[uncond; cond]; neg_prompt_ids None: zeros (force_zeros_for_empty_prompt)."""
        cond = self.encode_prompt(params, prompt_ids)
        if neg_prompt_ids is None:
            uncond = jax.tree_util.tree_map(jnp.zeros_like, cond)
        else:
            uncond = self.encode_prompt(params, neg_prompt_ids)
        return jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)

    def guided_model(self, params, context: SDXLTextEmbeddings, guidance_scale, output_attentions: bool = False,
                     extra_channels=None, unet_inputs=None, guidance_rescale=None):
        """SD's guided model with the UNet's added_cond_kwargs: text_embeds from the text, time ids from
        `unet_inputs` (the call's micro-conditioning) or, without them, diffusers' defaults for the sample's size."""
        factor = self.vae_scale_factor

        def sdxl_inputs(x, t, i):
            kw = dict(unet_inputs(x, t, i)) if unet_inputs is not None else {}
            time_ids = kw.pop("time_ids", None)
            if time_ids is None:
                time_ids = self.default_time_ids(x.shape[0] // 2, x.shape[2] * factor, x.shape[3] * factor)
            kw["added_cond_kwargs"] = {"text_embeds": context.text_embeds, "time_ids": time_ids}
            return kw

        return super().guided_model(params, context.hidden_states, guidance_scale, output_attentions,
                                    extra_channels=extra_channels, unet_inputs=sdxl_inputs,
                                    guidance_rescale=guidance_rescale)

    def micro_condition(self, cond: Conditioning, inputs: dict) -> Conditioning:
        """The call's time ids ([negative; positive]) as a UNet input of every step, and its end."""
        time_ids = jnp.concatenate([inputs["negative_time_ids"], inputs["time_ids"]]).astype(jnp.float32)
        previous = cond.unet_inputs

        def unet_inputs(x, t, i):
            kw = dict(previous(x, t, i)) if previous is not None else {}
            kw["time_ids"] = time_ids
            return kw

        end = inputs["end"].reshape(-1)[0] if "end" in inputs else cond.end
        return cond.replace(unet_inputs=unet_inputs, end=end)

    def condition(self, settings, inputs, params, state, noise_key) -> Conditioning:
        return self.micro_condition(super().condition(settings, inputs, params, state, noise_key), inputs)

    def output_images(self, settings, params, latents):
        if getattr(settings, "output_latents", False):
            return latents, jnp.all(jnp.isfinite(latents))
        return super().output_images(settings, params, latents)

    def _vae_params(self, vae_params):
        if not self.vae_upcast:
            return vae_params
        return jax.tree_util.tree_map(lambda p: jnp.asarray(p).astype(jnp.float32), vae_params)

    def _has_latents_stats(self) -> bool:
        return self.vae.latents_mean is not None and self.vae.latents_std is not None

    def _stats(self, like):
        shape = (1, -1, 1, 1)
        return (jnp.asarray(self.vae.latents_mean, like.dtype).reshape(shape),
                jnp.asarray(self.vae.latents_std, like.dtype).reshape(shape))

    def decode_latents(self, vae_params, latents):
        """Latents (scaled) -> images [B, H, W, 3] float32 in [0, 1]; the VAE in float32 when it upcasts, and
        latents_mean/latents_std undone when the VAE's config has them (as diffusers' SDXL pipelines)."""
        z = latents.astype(jnp.float32) if self.vae_upcast else latents
        if self._has_latents_stats():
            mean, std = self._stats(z)
            z = z * std / self.vae.scaling_factor + mean
        else:
            z = z / self.vae.scaling_factor
        image = self.vae.apply({"params": self._vae_params(vae_params)}, z, method=self.vae.decode)
        image = (image.astype(jnp.float32) / 2 + 0.5).clip(0, 1)
        return image.transpose(0, 2, 3, 1)

    def encode_images(self, params, images, key, sample_posterior: bool = True):
        """NCHW images in [-1, 1] -> scaled latents (float32 VAE when it upcasts; latents_mean/std as diffusers)."""
        dtype = jnp.float32 if self.vae_upcast else self.dtype
        posterior = self.vae.apply({"params": self._vae_params(params["vae"])}, images.astype(dtype),
                                   method=self.vae.encode)
        z = (posterior.sample(key) if sample_posterior else posterior.mode()).astype(jnp.float32)
        if self._has_latents_stats():
            mean, std = self._stats(z)
            return (z - mean) * self.vae.scaling_factor / std
        return z * self.vae.scaling_factor


def _vae_force_upcast(config_path: Path) -> bool:
    """The VAE config's force_upcast (diffusers' default: true); a missing or unreadable config is reported by
    AutoencoderKL.from_pretrained itself."""
    if not config_path.is_file():
        return True
    try:
        return bool(read_json(config_path, "VAE config").get("force_upcast", True))
    except SdjaxError:
        return True


class FlaxStableDiffusionXLPipeline(StableDiffusionXLMixin, FlaxStableDiffusionPipeline):
    """diffusers' StableDiffusionXLPipeline in JAX: text -> image with the trajectory and x̂0 of every step."""

    diffusers_class = "StableDiffusionXLPipeline"
    negative_rule = "text2img"

    def prepare_inputs(self, prompt, prompt_2=None) -> np.ndarray:
        """Tokenize prompts for every text encoder: int32 [B, 2, 77] (row 0: tokenizer, row 1: tokenizer_2 on
        prompt_2, default prompt); [B, 1, 77] for a folder with text_encoder_2 only."""
        return self.tokenize(prompt, prompt_2)

    def __call__(self, prompt_ids, params, prng_seed, num_inference_steps: int = 50,
                 guidance_scale: float | jax.Array = 5.0, height: int | None = None, width: int | None = None,
                 latents=None, neg_prompt_ids=None, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None,
                 check_finite: bool = True, *, guidance_rescale: float | jax.Array = 0.0, original_size=None,
                 crops_coords_top_left=None, target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=None, negative_target_size=None, aesthetic_score=None,
                 negative_aesthetic_score=None, denoising_end: float | None = None, output_type: str = "images"):
        """Generate images (and the trajectory) in one compiled call; arguments as FlaxStableDiffusionPipeline's,
        plus diffusers' SDXL ones (keywords):

        neg_prompt_ids: [B, 2, 77] (prepare_inputs); None: zero embeddings if force_zeros_for_empty_prompt (the
            base's model_index.json), else the empty prompt's.
        guidance_rescale: a number or one per prompt (traced).
        original_size, crops_coords_top_left, target_size (+ negative_*): pairs (height, width) / (top, left), or
            one pair per prompt [B, 2]; traced. aesthetic_score, negative_aesthetic_score: for a UNet conditioned on
            them (requires_aesthetics_score).
        denoising_end: a fraction in (0, 1): stop before the first timestep below round(T - denoising_end x T)
            (the base of base + refiner); traced. The trajectory holds the steps run.
        output_type: "images" or "latent" (the final latents in `images`, not decoded: the refiner's input).
        """
        settings, inputs = self.prepare_call(prompt_ids, params, prng_seed, num_inference_steps, guidance_scale,
                                             height, width, latents, neg_prompt_ids, jit, mesh, return_trajectory,
                                             output_attentions)
        latent = self.check_output_type(output_type)
        _, end = self.denoising_range(settings.num_inference_steps, None, denoising_end)
        micro = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                     target_size=target_size, negative_original_size=negative_original_size,
                     negative_crops_coords_top_left=negative_crops_coords_top_left,
                     negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                     negative_aesthetic_score=negative_aesthetic_score)
        self.add_sdxl_inputs(inputs, self.prompt_batch_shape(prompt_ids), settings.height, settings.width,
                             guidance_rescale, micro, end)
        settings = XLSettings(**dataclasses.asdict(settings), output_latents=latent)
        outputs = self._run(settings, inputs, params, prng_seed, jit=jit, mesh=mesh)
        return self.finish(outputs, params, jit, decode_trajectory=decode_trajectory, check_finite=check_finite,
                           end=end)


class FlaxStableDiffusionXLImg2ImgPipeline(StableDiffusionXLMixin, FlaxStableDiffusionImg2ImgPipeline):
    """diffusers' StableDiffusionXLImg2ImgPipeline in JAX (SDXL's refiner, or image-to-image with the base).

    `image` may be images (NCHW in [-1, 1], prepare_inputs) or latents [B, 4, h, w] (the base's
    output_type="latent"), used as they are, as diffusers does with a 4-channel image."""

    diffusers_class = "StableDiffusionXLImg2ImgPipeline"
    negative_rule = "img2img"

    def prepare_inputs(self, prompt, image=None, prompt_2=None):
        """(prompt ids [B, E, 77], images NCHW in [-1, 1]); with only prompts, the ids."""
        ids = self.tokenize(prompt, prompt_2)
        return ids if image is None else (ids, self.prepare_images(image))

    def _is_latents(self, shape) -> bool:
        return len(shape) >= 3 and shape[-3] == self.vae.latent_channels and shape[-3] != self.vae.in_channels

    def check_images(self, image, batch_shape: tuple, name: str = "image"):
        """Images (see FlaxStableDiffusionImg2ImgPipeline.check_images) or latents [B, 4, h, w] -> (array, H, W)."""
        arr = np.asarray(image)
        if not (arr.dtype.kind == "f" and arr.ndim == len(batch_shape) + 3 and self._is_latents(arr.shape)):
            return super().check_images(image, batch_shape, name)
        if not np.all(np.isfinite(arr)):
            raise InputError(f"`{name}` (latents) holds NaN or inf")
        f = self.vae_scale_factor
        height, width = arr.shape[-2] * f, arr.shape[-1] * f
        multiple = self.size_multiple()
        if height % multiple or width % multiple:
            raise InputError(f"`{name}` are latents of {width}x{height} pixels (WxH); sizes must be multiples of "
                             f"{multiple} (the VAE factor {f} x the UNet's downsampling)")
        lead = arr.shape[:len(batch_shape)]
        if lead != tuple(batch_shape):
            if lead != (1,) * len(batch_shape):
                raise InputError(f"`{name}` has {lead} latents for prompt_ids' {tuple(batch_shape)}: one per prompt, "
                                 "or one for all")
            arr = np.broadcast_to(arr, tuple(batch_shape) + arr.shape[len(batch_shape):])
        return jnp.asarray(arr, jnp.float32), int(height), int(width)

    def image_latents(self, settings, inputs, params, key):
        image = inputs["image"]
        if self._is_latents(image.shape):
            return image.astype(jnp.float32)
        return super().image_latents(settings, inputs, params, key)

    def condition(self, settings, inputs, params, state, noise_key) -> Conditioning:
        """As image-to-image (the image's latents noised to the first step run), but with denoising_start the
        latents are taken as they are (diffusers' add_noise=False: the base left them at that noise level)."""
        start = inputs["start"].reshape(-1)[0]
        image_key, draw_key = jax.random.split(noise_key)
        z0 = self.image_latents(settings, inputs, params, image_key)
        noise = inputs.get("noise")
        if noise is None:
            noise = jax.random.normal(draw_key, z0.shape, jnp.float32)
        noised = self.scheduler.add_noise_at_step(state, z0, noise, start)
        latents = jnp.where(inputs["add_noise"].reshape(-1)[0], noised, z0)
        return self.micro_condition(Conditioning(latents=latents, start=start), inputs)

    def __call__(self, prompt_ids, image, params, prng_seed, strength: float = 0.3, num_inference_steps: int = 50,
                 height: int | None = None, width: int | None = None, guidance_scale: float | jax.Array = 5.0,
                 noise=None, neg_prompt_ids=None, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None,
                 check_finite: bool = True, sample_posterior: bool = True, *,
                 guidance_rescale: float | jax.Array = 0.0, original_size=None, crops_coords_top_left=None,
                 target_size=None, negative_original_size=None, negative_crops_coords_top_left=None,
                 negative_target_size=None, aesthetic_score=None, negative_aesthetic_score=None,
                 denoising_start: float | None = None, denoising_end: float | None = None,
                 output_type: str = "images"):
        """Denoise `image` toward the prompts; arguments as FlaxStableDiffusionImg2ImgPipeline's (strength default
        0.3, guidance 5.0, as diffusers' SDXL img2img) plus the SDXL keywords of FlaxStableDiffusionXLPipeline, and:

        denoising_start: a fraction in (0, 1): start at the first timestep below round(T - denoising_start x T)
            from `image` as it is, not noised (strength is then not used): the refiner of base + refiner, given
            the base's latents (output_type="latent" with denoising_end = the same fraction). Traced.
        aesthetic_score / negative_aesthetic_score (default 6.0 / 2.5): the refiner's conditioning.
        """
        latent = self.check_output_type(output_type)
        settings, inputs, start = self.prepare_image_call(
            prompt_ids, image, params, prng_seed, strength if denoising_start is None else 1.0, num_inference_steps,
            height, width, guidance_scale, noise, neg_prompt_ids, jit, mesh, return_trajectory, output_attentions,
            sample_posterior, settings_cls=XLImageSettings, output_latents=latent)
        batch_shape = self.prompt_batch_shape(prompt_ids)
        first, end = self.denoising_range(settings.num_inference_steps, denoising_start, denoising_end, start)
        if first is not None:
            start = first
            inputs["start"] = jnp.full(batch_shape, start, jnp.int32)
        inputs["add_noise"] = jnp.full(batch_shape, denoising_start is None)
        micro = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                     negative_original_size=negative_original_size,
                     negative_crops_coords_top_left=negative_crops_coords_top_left,
                     negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                     negative_aesthetic_score=negative_aesthetic_score)
        self.add_sdxl_inputs(inputs, batch_shape, settings.height, settings.width, guidance_rescale, micro, end)
        outputs = self._run(settings, inputs, params, prng_seed, jit=jit, mesh=mesh)
        return self.finish(outputs, params, jit, start=start, decode_trajectory=decode_trajectory,
                           check_finite=check_finite, end=end)

    def merge(self, *args, **kwargs):
        raise SdjaxError("merging is not implemented for SDXL (FlaxStableDiffusionMergePipeline runs SD 1.x/2.x)")
