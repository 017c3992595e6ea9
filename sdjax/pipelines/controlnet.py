"""ControlNet on the one engine: text -> image steered by control images (edges, poses, silhouettes ...).

    pipe, params = FlaxStableDiffusionControlNetPipeline.from_pretrained(sd_path, controlnet=controlnet_path)
    prompt_ids = pipe.prepare_text_inputs(["a red circle on a white background"])
    image = pipe.prepare_image_inputs(pil_image)                 # [B, 3, H, W] float32 in [0, 1]
    out = pipe(prompt_ids, image, params, key, num_inference_steps=25, controlnet_conditioning_scale=0.8)
    out.images, out.trajectory                                   # as the text-to-image pipeline's

diffusers' Flax calling style (`FlaxStableDiffusionControlNetPipeline`: params["controlnet"], prepare_text_inputs,
prepare_image_inputs, controlnet_conditioning_scale) with the semantics of diffusers' PyTorch
`StableDiffusionControlNetPipeline`: several ControlNets at once (a tuple of modules, params["controlnet"] one
params tree each, one control image and one scale each, their residuals summed), control_guidance_start /
control_guidance_end (the fraction of the steps each ControlNet acts on), guess mode (the ControlNet sees only the
conditional half of classifier-free guidance and its residuals are scaled 0.1 -> 1.0 from the first skip to the
mid block). It is the text-to-image pipeline with one more `condition`: the UNet's per-step inputs
(`Conditioning.unet_inputs`) are the ControlNets' residuals; the loop, trajectory and x̂0 are the engine's.

Scales, start/end and the control images are traced: changing them never recompiles. start/end become diffusers'
`controlnet_keep` table on the host (one 0/1 per model call and ControlNet, computed in float64 as diffusers does)
that the program reads at each step. Guess mode is static (it changes the program).

Control images: float [0, 1] (not [-1, 1]), NCHW, the output's size. `prepare_image_inputs` resizes PIL images
to the requested size with Lanczos exactly as diffusers' control image processor does (then converts to RGB);
arrays of another size are refused (resize them, or pass PIL images).

`FlaxStableDiffusionControlNetImg2ImgPipeline` composes the same conditioning with image-to-image (diffusers'
`StableDiffusionControlNetImg2ImgPipeline`): start from an image's noised latents, ControlNets steer every step
run; control_guidance_start/end count the steps that are run, as in diffusers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..errors import ConfigError, InputError
from ..io import read_json, write_json
from ..models.controlnet import ControlNetModel, check_compatible
from .base import _param_shapes, open_pipeline_folder, runtime_for, weight_patterns
from .engine import Conditioning, Settings
from .image_to_image import FlaxStableDiffusionImg2ImgPipeline, ImageSettings
from .stable_diffusion import FlaxStableDiffusionPipeline


@dataclasses.dataclass(frozen=True)
class ControlNetSettings(Settings):
    guess_mode: bool = False  # static: the ControlNets run on the conditional half only


@dataclasses.dataclass(frozen=True)
class ControlNetImageSettings(ImageSettings):
    guess_mode: bool = False


def controlnet_keep(num_calls: int, starts, ends, first_call: int = 0) -> np.ndarray:
    """diffusers' `controlnet_keep`: [num_calls, K] of 1.0 where ControlNet k acts at model call i, else 0.0.

    Over the calls that are run (first_call .. num_calls - 1; image-to-image starts midway), call j = i - first_call
    of n keeps ControlNet k unless j / n < start_k or (j + 1) / n > end_k (Python floats, as diffusers)."""
    n = num_calls - first_call
    keep = np.zeros((num_calls, len(starts)), np.float32)
    for j in range(n):
        keep[first_call + j] = [1.0 - float(j / n < s or (j + 1) / n > e) for s, e in zip(starts, ends)]
    return keep


def to_control_images(images, height: int | None = None, width: int | None = None, multiple: int = 8,
                      name: str = "image") -> np.ndarray:
    """PIL images, or float [H, W, C] / [B, H, W, C] in [0, 1] (or uint8) -> NCHW float32 [B, 3, H, W] in [0, 1].

    PIL images are resized to (width, height) with Lanczos and then converted to RGB, as diffusers' control image
    processor (VaeImageProcessor(do_convert_rgb=True, do_normalize=False)) does; without height/width, their own
    size rounded down to a multiple of `multiple`. Arrays must already have the size (else InputError)."""
    from PIL import Image

    items = [images] if hasattr(images, "getpixel") else images
    if not hasattr(items, "getpixel") and not isinstance(items, (list, tuple)):
        arr = np.asarray(items)
        items = [arr] if arr.ndim <= 3 else list(arr)
    if len(items) == 0:
        raise InputError(f"`{name}` is empty")
    out = []
    for k, im in enumerate(items):
        if hasattr(im, "getpixel"):
            h = height if height is not None else im.height - im.height % multiple
            w = width if width is not None else im.width - im.width % multiple
            if h < 1 or w < 1:
                raise InputError(f"`{name}[{k}]` is {im.width}x{im.height}, smaller than {multiple} pixels")
            im = im.resize((w, h), resample=Image.LANCZOS, reducing_gap=None).convert("RGB")
            arr = np.asarray(im, np.float32) / 255.0
        else:
            arr = np.asarray(im)
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
                raise InputError(f"`{name}[{k}]` must be [H, W, 3] (or [H, W] / [H, W, 1] gray), got shape {arr.shape}")
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255.0
            elif arr.dtype.kind != "f":
                raise InputError(f"`{name}[{k}]` must be float in [0, 1] or uint8, got {arr.dtype}")
            arr = arr.astype(np.float32)
            if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
                raise InputError(f"`{name}[{k}]` must hold values in [0, 1] (a control image is not in [-1, 1])")
            if arr.shape[-1] == 1:
                arr = np.repeat(arr, 3, axis=-1)
            want = (height or arr.shape[0], width or arr.shape[1])
            if arr.shape[:2] != want:
                raise InputError(f"`{name}[{k}]` is {arr.shape[1]}x{arr.shape[0]} (WxH), the output {want[1]}x{want[0]}:"
                                 " resize it, or pass a PIL image (resized with Lanczos as diffusers does)")
        out.append(arr)
    sizes = {a.shape for a in out}
    if len(sizes) > 1:
        raise InputError(f"`{name}` have different sizes {sorted(s[:2] for s in sizes)}; give images of one size")
    return np.stack(out).transpose(0, 3, 1, 2)


def _as_controlnets(controlnet) -> tuple:
    if controlnet is None:
        return ()
    items = tuple(controlnet) if isinstance(controlnet, (list, tuple)) else (controlnet,)
    for k, c in enumerate(items):
        if not isinstance(c, ControlNetModel):
            raise ConfigError(f"controlnet[{k}] must be a ControlNetModel (or give from_pretrained a path), got "
                              f"{type(c).__name__}")
    return items


def load_controlnets(paths, dtype=jnp.float32, param_dtype=None, allow_pickle: bool = False,
                     revision: str | None = None, abstract: bool = False, **runtime) -> tuple[tuple, tuple]:
    """(modules, params): one ControlNet per path (a diffusers ControlNet folder or hub repo id)."""
    items = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    modules, params = [], []
    for p in items:
        cn, cn_params = ControlNetModel.from_pretrained(p, dtype=dtype, param_dtype=param_dtype,
                                                        allow_pickle=allow_pickle, revision=revision,
                                                        abstract=abstract, **runtime_for(ControlNetModel, runtime))
        modules.append(cn)
        params.append(cn_params)
    return tuple(modules), tuple(params)


class ControlNetMixin:
    """The ControlNet part, for any pipeline of the family: modules and checks, the control inputs of a call, and
    `condition` = the base pipeline's conditioning plus the ControlNets' residuals as per-step UNet inputs.
    Put it first among the bases: `class P(ControlNetMixin, FlaxStableDiffusion...Pipeline)`."""

    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "controlnet")

    def __init__(self, text_encoder, vae, unet, tokenizer, scheduler, dtype=jnp.float32,
                 scheduler_base_config: dict | None = None, controlnet=None):
        super().__init__(text_encoder, vae, unet, tokenizer, scheduler, dtype=dtype,
                         scheduler_base_config=scheduler_base_config)
        self.controlnet = _as_controlnets(controlnet)
        for k, cn in enumerate(self.controlnet):
            which = f"controlnet[{k}]" if len(self.controlnet) > 1 else "the ControlNet"
            try:
                check_compatible(cn, unet)
            except ConfigError as e:
                raise ConfigError(f"{which}: {e}") from None
            if cn.cond_downscale() != self.vae_scale_factor:
                raise ConfigError(
                    f"{which} embeds its control image with {cn.cond_downscale()}x downsampling "
                    f"(conditioning_embedding_out_channels {cn.conditioning_embedding_out_channels}), the VAE's factor "
                    f"is {self.vae_scale_factor}: the control image (the output's size) would not match the latents")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, controlnet=None, dtype=jnp.float32, scheduler=None,
                        param_dtype=None, allow_pickle: bool = False, revision: str | None = None,
                        abstract: bool = False, vae_encoder: bool = True, **runtime):
        """The base Stable Diffusion folder (or repo id), plus `controlnet`: a ControlNet folder / repo id, or a list
        of them (loaded; params["controlnet"] is a tuple, one params tree each), or ControlNetModel module(s)
        (put their params in params["controlnet"] yourself, as with diffusers' Flax pipeline). Without
        `controlnet`, the folder's own controlnet/ (a StableDiffusionControlNetPipeline folder) is loaded."""
        kw = dict(dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle, revision=revision, abstract=abstract)
        pipe, params = super().from_pretrained(pretrained_model_name_or_path, scheduler=scheduler,
                                               vae_encoder=vae_encoder, **kw, **runtime)
        if controlnet is None:
            root, _ = open_pipeline_folder(pretrained_model_name_or_path, weight_patterns(cls.components),
                                           revision=revision)
            if not (root / "controlnet" / "config.json").is_file():
                raise ConfigError(f"{root} has no controlnet/ folder: pass controlnet=PATH (a diffusers ControlNet "
                                  "folder or repo id), or a list of them")
            controlnet = str(root / "controlnet")
        items = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]
        if all(isinstance(c, ControlNetModel) for c in items):
            modules = tuple(items)
        elif all(isinstance(c, (str, Path)) for c in items):
            modules, params["controlnet"] = load_controlnets(items, **kw, **runtime)
        else:
            raise ConfigError("controlnet= takes ControlNet folders / repo ids or ControlNetModel modules, not a mix "
                              f"(got {', '.join(type(c).__name__ for c in items)})")
        return cls.from_pipe(pipe, controlnet=modules), params

    @classmethod
    def from_pipe(cls, pipe, **changes):
        """This pipeline over another pipeline's modules (nothing reloaded); `controlnet=` module(s) to add or
        replace (kept from `pipe` when it has them)."""
        if "controlnet" not in changes:
            changes["controlnet"] = getattr(pipe, "controlnet", None)
        return super().from_pipe(pipe, **changes)

    def save_pretrained(self, save_directory, params) -> None:
        """A folder diffusers' StableDiffusionControlNetPipeline loads (one ControlNet: controlnet/)."""
        if len(self.controlnet) != 1:
            raise ConfigError(f"save_pretrained writes one ControlNet (controlnet/); this pipeline has "
                              f"{len(self.controlnet)}: save them with ControlNetModel.save_pretrained")
        super().save_pretrained(save_directory, params)
        root = Path(save_directory)
        self.controlnet[0].save_pretrained(root / "controlnet", self.controlnet_params(params)[0])
        index = read_json(root / "model_index.json")
        index |= {"_class_name": "StableDiffusionControlNetPipeline", "controlnet": ["diffusers", "ControlNetModel"],
                  "image_encoder": [None, None]}
        write_json(root / "model_index.json", index)

    # ------------------------------------------------------------------ params
    def param_components(self) -> tuple[str, ...]:
        return tuple(c for c in super().param_components() if c != "controlnet")

    def controlnet_params(self, params) -> tuple:
        """params["controlnet"] as a tuple, one params tree per ControlNet (a single tree is accepted for one)."""
        p = params.get("controlnet") if isinstance(params, dict) else None
        if isinstance(p, (list, tuple)):
            return tuple(p)
        if isinstance(p, dict) and len(self.controlnet) == 1:
            return (p,)
        raise InputError(f"`params['controlnet']` must hold one params tree per ControlNet ({len(self.controlnet)}, "
                         f"a list or tuple), got {type(p).__name__ if p is not None else 'nothing'}")

    def check_params(self, params, jit: bool = False) -> None:
        super().check_params(params, jit)
        cn_params = self.controlnet_params(params)
        if len(cn_params) != len(self.controlnet):
            raise InputError(f"`params['controlnet']` has {len(cn_params)} params trees for {len(self.controlnet)} "
                             "ControlNets")
        for k, (cn, p) in enumerate(zip(self.controlnet, cn_params)):
            got = dict(jax.tree_util.tree_leaves_with_path(p))
            for path, leaf in jax.tree_util.tree_leaves_with_path(_param_shapes(cn)):
                have = got.get(path)
                shape = None if have is None else tuple(np.shape(have))[1 if jit else 0:]
                if shape != tuple(leaf.shape):
                    raise InputError(f"`params['controlnet'][{k}]{jax.tree_util.keystr(path)}` has shape {shape}, "
                                     f"expected {tuple(leaf.shape)}; the params must be the ControlNet's own")

    def _with_controlnet_params(self, params):
        """params with params["controlnet"] as a tuple (one program whether a list, tuple or single tree was given)."""
        return {**params, "controlnet": self.controlnet_params(params)}

    # ------------------------------------------------------------------ inputs
    def prepare_text_inputs(self, prompt) -> np.ndarray:
        """diffusers' Flax name for prepare_inputs: prompts -> int32 token ids [B, 77]."""
        return FlaxStableDiffusionPipeline.prepare_inputs(self, prompt)

    def prepare_image_inputs(self, image, height: int | None = None, width: int | None = None) -> np.ndarray:
        """Control image(s): PIL (resized with Lanczos to height x width, default its own size rounded down to a size
        the model takes, as diffusers' control image processor) or float [.., H, W, 3] in [0, 1] of the output's size
        -> NCHW float32 [B, 3, H, W] in [0, 1]. One call per ControlNet; give __call__ a list for several."""
        return to_control_images(image, height, width, self.size_multiple(), "image")

    def check_control_inputs(self, image, controlnet_conditioning_scale, control_guidance_start,
                             control_guidance_end, batch_shape: tuple, height: int | None, width: int | None,
                             name: str = "image"):
        """The control images (one per ControlNet), scales and start/end as the program takes them:
        ({control images, scales}, (height, width), (starts, ends)). InputError naming the argument."""
        k = len(self.controlnet)
        if k == 0:
            raise InputError("this pipeline has no ControlNet: from_pretrained(..., controlnet=PATH) or "
                             "from_pipe(pipe, controlnet=module)")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(images) != k:
            raise InputError(f"{len(images)} control image{'s' if len(images) != 1 else ''} for {k} ControlNet"
                             f"{'s' if k != 1 else ''}: give one per ControlNet (a list, in the ControlNets' order)")
        arrays, size = [], None
        nd = len(batch_shape) + 3
        for j, (cn, im) in enumerate(zip(self.controlnet, images)):
            what = f"{name}[{j}]" if k > 1 else name
            arr = np.asarray(im)
            if arr.dtype.kind != "f" or arr.ndim != nd:
                raise InputError(f"`{what}` must be float control images [{'n_devices, per_device' if nd == 5 else 'batch'}"
                                 f", {cn.conditioning_channels}, H, W] in [0, 1] (pipe.prepare_image_inputs), got "
                                 f"{arr.dtype} of shape {tuple(arr.shape)}")
            if arr.shape[-3] != cn.conditioning_channels:
                raise InputError(f"`{what}` has {arr.shape[-3]} channels; its ControlNet takes "
                                 f"{cn.conditioning_channels} (conditioning_channels)")
            if not np.all(np.isfinite(arr)) or arr.min() < -1e-4 or arr.max() > 1.0001:
                raise InputError(f"`{what}` must hold values in [0, 1] (control images are not in [-1, 1]; "
                                 "pipe.prepare_image_inputs makes them)")
            hw = tuple(int(s) for s in arr.shape[-2:])
            if size is not None and hw != size:
                raise InputError(f"`{what}` is {hw[1]}x{hw[0]} (WxH), `{name}[0]` {size[1]}x{size[0]}: all control "
                                 "images have the output's size")
            size = hw
            lead = arr.shape[:len(batch_shape)]
            if lead != tuple(batch_shape):
                if lead == (1,) * len(batch_shape):
                    arr = np.broadcast_to(arr, tuple(batch_shape) + arr.shape[len(batch_shape):])
                else:
                    raise InputError(f"`{what}` has {lead} images for prompt_ids' {tuple(batch_shape)}: one control "
                                     "image per prompt, or one for all")
            arrays.append(jnp.asarray(arr, jnp.float32))
        for name, given, actual in (("height", height, size[0]), ("width", width, size[1])):
            if given is not None and given != actual:
                raise InputError(f"`{name}` = {given}, but the control image is {actual}: the output has the control "
                                 "image's size (prepare_image_inputs(image, height=, width=) resizes PIL images)")
        scales = self._per_controlnet(controlnet_conditioning_scale, "controlnet_conditioning_scale")
        starts = self._per_controlnet(control_guidance_start, "control_guidance_start")
        ends = self._per_controlnet(control_guidance_end, "control_guidance_end")
        for j, (s, e) in enumerate(zip(starts, ends)):
            which = f" (ControlNet {j})" if k > 1 else ""
            if not 0.0 <= s < e <= 1.0:
                raise InputError(f"`control_guidance_start` = {s} and `control_guidance_end` = {e}{which}: need "
                                 "0 <= start < end <= 1 (the fraction of the steps the ControlNet acts on)")
        inputs = {"control_image": tuple(arrays),
                  "controlnet_conditioning_scale": jnp.asarray(np.broadcast_to(np.asarray(scales, np.float32),
                                                                               tuple(batch_shape) + (k,)))}
        return inputs, size, (starts, ends)

    def _per_controlnet(self, value, name: str) -> list[float]:
        """A number for all ControlNets, or one per ControlNet -> K finite floats."""
        k = len(self.controlnet)
        try:
            arr = np.asarray(value, np.float64)
        except (TypeError, ValueError):
            raise InputError(f"`{name}` must be a number or one number per ControlNet ({k}), got {value!r}") from None
        if arr.ndim == 0:
            arr = np.full(k, float(arr))
        if arr.shape != (k,):
            raise InputError(f"`{name}` has {arr.size} values for {k} ControlNet{'s' if k != 1 else ''}: give a number, "
                             "or one per ControlNet")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"`{name}` must be finite, got {value!r}")
        return [float(v) for v in arr]

    def guess_mode_for(self, guess_mode: bool) -> bool:
        """diffusers: guess mode is on when asked, or when the (first) ControlNet pools its conditions globally."""
        return bool(guess_mode) or bool(self.controlnet and self.controlnet[0].global_pool_conditions)

    def keep_table(self, num_inference_steps: int, height: int, width: int, starts, ends, batch_shape: tuple,
                   first_call: int = 0):
        """controlnet_keep [*batch, N calls, K] for the program (traced: changing start/end never recompiles)."""
        shape = self.latent_shape(1, height, width)
        n = self.scheduler.num_model_calls(jax.eval_shape(lambda: self.scheduler.set_timesteps(num_inference_steps,
                                                                                               shape)))
        keep = controlnet_keep(n, starts, ends, first_call)
        return jnp.asarray(np.broadcast_to(keep, tuple(batch_shape) + keep.shape))

    # ------------------------------------------------------------------ the computation (traced)
    def condition(self, settings, inputs: dict, params, state, noise_key) -> Conditioning:
        cond = super().condition(settings, inputs, params, state, noise_key)
        control = self.control_unet_inputs(settings, inputs, params)
        base = cond.unet_inputs
        unet_inputs = control if base is None else (lambda x, t, i: {**base(x, t, i), **control(x, t, i)})
        return cond.replace(unet_inputs=unet_inputs)

    def control_unet_inputs(self, settings, inputs: dict, params):
        """fn(x, t, i) -> the UNet's residual arguments at model call i on input x ([2B, ...]: uncond, cond): every
        ControlNet on the same input, scaled by its controlnet_conditioning_scale x controlnet_keep[i], summed in
        order (diffusers' MultiControlNetModel). Guess mode: the ControlNets see only the conditional half and the
        unconditional half gets zeros, as diffusers."""
        guess = bool(getattr(settings, "guess_mode", False))
        batch = inputs["prompt_ids"].shape[0]
        # the text embeddings the UNet sees (XLA computes the identical text encoder call once)
        context = self.text_context(params, inputs["prompt_ids"], inputs["neg_prompt_ids"])
        scales = inputs["controlnet_conditioning_scale"][0]  # [K], the same for every sample
        keep = inputs["controlnet_keep"][0]  # [N, K]
        if guess:
            context = context[batch:]
        images = [im.astype(self.dtype) if guess else jnp.concatenate([im] * 2).astype(self.dtype)
                  for im in inputs["control_image"]]
        latent_channels = self.vae.latent_channels
        nets = tuple(zip(self.controlnet, params["controlnet"], images))

        def unet_inputs(x, t, i):
            x = x[:, :latent_channels].astype(self.dtype)  # an inpainting UNet's mask channels are not the ControlNet's
            if guess:
                x = x[batch:]
            down = mid = None
            for k, (cn, p, image) in enumerate(nets):
                d, m = cn.apply({"params": p}, x, t, context, image, conditioning_scale=scales[k] * keep[i, k],
                                guess_mode=guess, return_dict=False)
                down = d if down is None else tuple(a + b for a, b in zip(down, d))
                mid = m if mid is None else mid + m
            if guess:
                down = tuple(jnp.concatenate([jnp.zeros_like(d), d]) for d in down)
                mid = jnp.concatenate([jnp.zeros_like(mid), mid])
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return unet_inputs


class FlaxStableDiffusionControlNetPipeline(ControlNetMixin, FlaxStableDiffusionPipeline):
    """Text-to-image with ControlNets (diffusers' StableDiffusionControlNetPipeline), trajectory and x̂0 included."""

    def __call__(self, prompt_ids, image, params, prng_seed, num_inference_steps: int = 50,
                 guidance_scale: float | jax.Array = 7.5, height: int | None = None, width: int | None = None,
                 latents=None, neg_prompt_ids=None, controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                 control_guidance_end=1.0, guess_mode: bool = False, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None,
                 check_finite: bool = True):
        """Generate images steered by the control image(s), in one compiled call.

        image: the control image [B, 3, H, W] in [0, 1] (prepare_image_inputs), or a list of them, one per ControlNet
            (one per prompt, or one for all); the output has their size (height/width, if given, must agree).
        controlnet_conditioning_scale, control_guidance_start, control_guidance_end: a number, or one per ControlNet.
        guess_mode: the ControlNets act on the conditional half only (diffusers' guess mode; static).
        Other arguments as the text-to-image call (jit=True: pmap, with a device axis on prompt_ids, image, params and
        prng_seed; mesh: the batch split over the mesh)."""
        settings, inputs = self.prepare_control_call(
            prompt_ids, image, params, prng_seed, num_inference_steps, guidance_scale, height, width, latents,
            neg_prompt_ids, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode,
            jit, mesh, return_trajectory, output_attentions)
        params = self._with_controlnet_params(params)
        outputs = self._run(settings, inputs, params, prng_seed, jit=jit, mesh=mesh)
        return self.finish(outputs, params, jit, decode_trajectory=decode_trajectory, check_finite=check_finite)

    def prepare_control_call(self, prompt_ids, image, params, prng_seed, num_inference_steps, guidance_scale, height,
                             width, latents, neg_prompt_ids, controlnet_conditioning_scale, control_guidance_start,
                             control_guidance_end, guess_mode, jit, mesh, return_trajectory, output_attentions):
        """The text-to-image checks plus the control inputs: (ControlNetSettings, inputs)."""
        batch_shape = np.shape(prompt_ids)[:-1]
        control, (h, w), (starts, ends) = self.check_control_inputs(
            image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, batch_shape, height,
            width)
        settings, inputs = self.prepare_call(prompt_ids, params, prng_seed, num_inference_steps, guidance_scale, h, w,
                                             latents, neg_prompt_ids, jit, mesh, return_trajectory, output_attentions)
        inputs |= control
        inputs["controlnet_keep"] = self.keep_table(settings.num_inference_steps, h, w, starts, ends, batch_shape)
        settings = ControlNetSettings(**dataclasses.asdict(settings), guess_mode=self.guess_mode_for(guess_mode))
        return settings, inputs


class FlaxStableDiffusionControlNetImg2ImgPipeline(ControlNetMixin, FlaxStableDiffusionImg2ImgPipeline):
    """Image-to-image with ControlNets (diffusers' StableDiffusionControlNetImg2ImgPipeline): the denoising starts
    from `image`'s latents noised to `strength`, and the ControlNets steer every step that runs."""

    def __call__(self, prompt_ids, image, control_image, params, prng_seed, strength: float = 0.8,
                 num_inference_steps: int = 50, height: int | None = None, width: int | None = None,
                 guidance_scale: float | jax.Array = 7.5, noise=None, neg_prompt_ids=None,
                 controlnet_conditioning_scale=0.8, control_guidance_start=0.0, control_guidance_end=1.0,
                 guess_mode: bool = False, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None,
                 check_finite: bool = True, sample_posterior: bool = True):
        """image: NCHW in [-1, 1] (prepare_inputs / prepare_images); control_image: [B, 3, H, W] in [0, 1]
        (prepare_image_inputs), or a list, one per ControlNet; both of the output's size. The scale's default is
        diffusers' 0.8 for this pipeline. Other arguments as img2img's and the ControlNet text-to-image call's."""
        batch_shape = np.shape(prompt_ids)[:-1]
        control, (h, w), (starts, ends) = self.check_control_inputs(
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, batch_shape,
            height, width, name="control_image")
        if tuple(np.shape(image)[-2:]) != (h, w):
            raise InputError(f"`image` is {np.shape(image)[-1]}x{np.shape(image)[-2]} (WxH), `control_image` {w}x{h}: "
                             "both have the output's size")
        settings, inputs, start = self.prepare_image_call(
            prompt_ids, image, params, prng_seed, strength, num_inference_steps, h, w, guidance_scale, noise,
            neg_prompt_ids, jit, mesh, return_trajectory, output_attentions, sample_posterior,
            settings_cls=ControlNetImageSettings, guess_mode=self.guess_mode_for(guess_mode))
        inputs |= control
        inputs["controlnet_keep"] = self.keep_table(settings.num_inference_steps, h, w, starts, ends, batch_shape,
                                                    first_call=start)
        params = self._with_controlnet_params(params)
        outputs = self._run(settings, inputs, params, prng_seed, jit=jit, mesh=mesh)
        return self.finish(outputs, params, jit, start=start, decode_trajectory=decode_trajectory,
                           check_finite=check_finite)
