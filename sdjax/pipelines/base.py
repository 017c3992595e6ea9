"""What every pipeline shares: loading a diffusers folder, the modules-here/params-passed-in call style,
the choice of compiled program (single device, pmap, mesh), and decoding.

A pipeline object holds modules (Flax Linen, hashed by config), a tokenizer and a scheduler; no weights.
It is a static argument of `engine.run_jit` / `engine.run_pmap`, so it is equal and hashed by value:
two pipelines built from the same configs share compiled programs.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ..errors import ConfigError, InputError, NonFiniteError, SdjaxError
from ..hub import resolve_folder
from ..io import read_json
from ..models.autoencoder_kl import AutoencoderKL
from . import engine
from .adapters import AdaptersMixin
from .output import FlaxStableDiffusionPipelineOutput

logger = logging.getLogger(__name__)

_LOWERING = contextvars.ContextVar("sdjax_lowering", default=False)  # inside pipe.lower(...)


class _Lowered(Exception):  # noqa: N818 -- carries pipe.lower's result out of the call; never seen by users
    def __init__(self, lowered):
        super().__init__("lowered")
        self.lowered = lowered

# Components of a diffusers folder that sdjax does not run (and does not download).
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


class DiffusionPipeline(AdaptersMixin):
    """Base of sdjax's pipelines. Subclasses define `generate(settings, inputs, params, key)` (traced).
    LoRA and textual inversion (`load_lora_weights`, `set_adapters`, `fuse_lora`, `load_textual_inversion`):
    `AdaptersMixin` (adapters.py)."""

    #: the components this pipeline runs, by model_index.json name
    components: tuple[str, ...] = ()
    #: whether its calls encode images with the VAE (image-to-image, inpainting); if not, the VAE's encoder can
    #: stay unread: from_pretrained(..., vae_encoder=False)
    encodes_images: bool = False

    @classmethod
    def vae_skip(cls, vae_encoder: bool) -> tuple[str, ...]:
        """What from_pretrained's `vae_encoder` leaves unread of the VAE (`AutoencoderKL.from_pretrained(skip=)`)."""
        if not isinstance(vae_encoder, bool):
            raise InputError(f"`vae_encoder` must be True or False, got {vae_encoder!r}")
        if vae_encoder:
            return ()
        if cls.encodes_images:
            raise InputError(f"{cls.__name__} encodes images with the VAE: vae_encoder=False is for pipelines "
                             "that only decode (text-to-image)")
        return AutoencoderKL.ENCODER

    # ------------------------------------------------------------------ identity (static argument)
    def _identity(self) -> tuple:
        """Everything the compiled program depends on: the modules' and scheduler's configs and the dtype."""
        parts = [type(self), jnp.dtype(self.dtype).name]
        for name in self.components:
            if name == "tokenizer" or name.startswith("tokenizer"):
                continue
            parts.append(getattr(self, name))
        return tuple(parts)

    def __hash__(self):
        return hash(self._identity())

    def __eq__(self, other):
        return type(other) is type(self) and self._identity() == other._identity()

    # ------------------------------------------------------------------ running
    def _run(self, settings, inputs: dict, params, key, *, jit: bool = False, mesh: Mesh | None = None):
        """The compiled program for `settings` on `inputs` (a dict of batch-major arrays):
        jit=True: pmapped (inputs, params, key with a leading device axis); mesh: inputs split over the mesh."""
        if engine.show_progress.enabled and not settings.progress:  # the same call, with a step callback
            settings = dataclasses.replace(settings, progress=True)
            if _LOWERING.get():  # the program with the callback, no bar
                return self._run(settings, inputs, params, key, jit=jit, mesh=mesh)
            bar = engine.show_progress.bar(self.scheduler.num_model_calls(
                self.scheduler.set_timesteps(settings.num_inference_steps, (1,))))
            counter = engine.StepCounter(bar, callers=jax.local_device_count() if jit else 1)
            engine._BARS.append(counter)
            try:
                return jax.block_until_ready(self._run(settings, inputs, params, key, jit=jit, mesh=mesh))
            finally:
                engine._BARS.remove(counter)
                bar.close()
        params = self.adapter_call_params(params, jit)  # LoRA scales as traced arrays (adapters.py)
        program = engine.run_pmap if jit else engine.run_jit
        if mesh is not None:
            inputs, params, key = engine.place_on_mesh(mesh, inputs, params, key)
        if _LOWERING.get():  # pipe.lower(...): the program, lowered, instead of its result
            raise _Lowered(program.lower(self, settings, inputs, params, key))
        return program(self, settings, inputs, params, key)

    def lower(self, *args, **kwargs) -> jax.stages.Lowered:
        """The program `self(*args, **kwargs)` would run, traced and lowered, not run (`jax.stages.Lowered`:
        `.compile()` it, read its `.as_text()`, its `.cost_analysis()`). The arguments are the call's, checked
        the same way; `params` may be abstract (`jax.ShapeDtypeStruct` leaves), as from_pretrained(...,
        abstract=True) gives them, so a program can be compiled before the weights are read:

            pipe, shapes = FlaxStableDiffusionPipeline.from_pretrained(folder, abstract=True)  # configs only
            pipe.lower(ids, shapes, key, num_inference_steps=50).compile()
            pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder)
            images = pipe(ids, params, key, num_inference_steps=50).images  # the program compiled above

        Compiled programs go to JAX's cache, so the later call with arrays of the same shapes, dtypes and
        placement compiles nothing. On a CPU host this keeps XLA's compile working memory (~0.4 GB at SD 1.5's
        size) from adding to the weights' (the `sdjax` command does it; BENCHMARKS.md). A call that runs
        several programs (a cascade) gives its first. With jit=True (pmap) the later call places its arrays
        differently from the shapes and compiles again; lower with jit=False or a mesh to compile ahead."""
        token = _LOWERING.set(True)
        try:
            self(*args, **kwargs)
        except _Lowered as done:
            return done.lowered
        finally:
            _LOWERING.reset(token)
        raise SdjaxError(f"{type(self).__name__}'s call ran no compiled program to lower")

    # ------------------------------------------------------------------ checking a call's arguments (host side)
    # Every check runs before anything is traced or compiled, and names the argument and what was expected.
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor x the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.down_block_types) - 1)

    def check_size(self, height, width) -> tuple[int, int]:
        multiple = self.size_multiple()
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % multiple:
                raise InputError(f"`{name}` must be a positive multiple of {multiple} (the VAE factor "
                                 f"{self.vae_scale_factor} x the UNet's {multiple // self.vae_scale_factor}x "
                                 f"downsampling), got {v!r}")
        return int(height), int(width)

    def check_steps(self, num_inference_steps) -> int:
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"`num_inference_steps` must be an integer >= 1, got {n!r}")
        limit = self.scheduler.num_train_timesteps
        if n > limit:
            raise InputError(f"`num_inference_steps` = {n} is more than the {limit} timesteps the model was trained "
                             f"with (the scheduler's num_train_timesteps)")
        return int(n)

    def check_token_ids(self, ids, name: str, jit: bool, like=None):
        """int token ids [B, L] ([n_dev, per_dev, L] with jit=True), L <= the text encoder's positions,
        every id inside the vocabulary."""
        arr = np.asarray(ids)
        want = 3 if jit else 2
        length = self.tokenizer.model_max_length
        form = f"[n_devices, per_device, {length}]" if jit else f"[batch, {length}]"
        if arr.dtype.kind not in "iu" or arr.ndim != want:
            raise InputError(f"`{name}` must be {form} int token ids (pipe.prepare_inputs"
                             f"{', then shard' if jit else ''}), got {arr.dtype} of shape {tuple(arr.shape)}")
        if like is not None and arr.shape != np.shape(like):
            raise InputError(f"`{name}` has shape {tuple(arr.shape)}, but prompt_ids has {tuple(np.shape(like))}")
        if arr.shape[-1] > self.text_encoder.max_position_embeddings:
            raise InputError(f"`{name}` has {arr.shape[-1]} tokens per prompt; the text encoder takes at most "
                             f"{self.text_encoder.max_position_embeddings}")
        vocab = self.text_encoder.vocab_size
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            bad = arr.max() if arr.max() >= vocab else arr.min()
            raise InputError(f"`{name}` holds token id {int(bad)}, outside the text encoder's vocabulary "
                             f"[0, {vocab})")
        return jnp.asarray(arr, jnp.int32)

    def check_guidance(self, guidance_scale, batch_shape: tuple, name: str = "guidance_scale"):
        """A finite number, or one per prompt ([B]; with jit=True [n_devices] or [n_devices, per_device])."""
        try:
            g = np.asarray(guidance_scale, np.float32)
        except (TypeError, ValueError):
            raise InputError(f"`{name}` must be a number or an array of numbers, got {guidance_scale!r}") from None
        if not np.all(np.isfinite(g)):
            raise InputError(f"`{name}` must be finite, got {guidance_scale!r}")
        if len(batch_shape) == 2 and g.ndim == 1 and g.shape[0] == batch_shape[0]:
            g = g[:, None]  # jit=True: one per device, as diffusers shards it
        try:
            return jnp.asarray(np.broadcast_to(g, batch_shape))
        except ValueError:
            raise InputError(f"`{name}` has shape {g.shape}; expected a number or one per prompt "
                             f"{tuple(batch_shape)}") from None

    def check_latents(self, latents, shape: tuple, name: str = "latents"):
        arr = np.asarray(latents)
        if arr.dtype.kind != "f" or tuple(arr.shape) != tuple(shape):
            raise InputError(f"`{name}` must be a float array of shape {tuple(shape)} (batch, latent channels, "
                             f"height / {self.vae_scale_factor}, width / {self.vae_scale_factor}), got "
                             f"{arr.dtype} of shape {tuple(arr.shape)}")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"`{name}` holds NaN or inf")
        return jnp.asarray(arr, jnp.float32)

    def check_key(self, key, jit: bool):
        arr = jax.random.key_data(key) if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key) \
            else np.asarray(key)
        want = (jax.local_device_count(), 2) if jit else (2,)
        if arr.dtype != np.uint32 or tuple(arr.shape) != want:
            raise InputError(f"`prng_seed` must be a jax.random.PRNGKey{' per device [n_devices, 2]' if jit else ''}, "
                             f"got {arr.dtype} of shape {tuple(arr.shape)}")
        return key

    def check_params(self, params, jit: bool = False) -> None:
        """`params` has the tree and shapes this pipeline's modules need (with a device axis when jit=True)."""
        if not isinstance(params, dict):
            raise InputError(f"`params` must be the dict from from_pretrained ({', '.join(self.param_components())}), "
                             f"got {type(params).__name__}")
        for name in self.param_components():
            if name not in params:
                raise InputError(f"`params` has no {name!r} (it has: {', '.join(map(str, params))})")
            got = params[name]
            skip = ()
            if name == "vae" and isinstance(got, dict) and "encoder" not in got:  # from vae_encoder=False
                if self.encodes_images:
                    raise InputError(f"`params['vae']` has no encoder (loaded with vae_encoder=False), and "
                                     f"{type(self).__name__} encodes images: load with vae_encoder=True (the default)")
                skip = self.vae_skip(False)
            expected = _param_shapes(getattr(self, name), skip)
            want_leaves = jax.tree_util.tree_leaves_with_path(expected)
            try:
                got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
            except Exception:
                got_leaves = {}
            for path, leaf in want_leaves:
                have = got_leaves.get(path)
                shape = None if have is None else tuple(np.shape(have))
                if jit and shape is not None:
                    shape = shape[1:]
                if shape != tuple(leaf.shape):
                    where = jax.tree_util.keystr(path)
                    raise InputError(f"`params[{name!r}]{where}` has shape {shape}, expected {tuple(leaf.shape)}"
                                     + (" (with a leading device axis: flax.jax_utils.replicate)" if jit else "")
                                     + "; params must come from this pipeline's from_pretrained")
        self.check_adapters(params, jit)

    def param_components(self) -> tuple[str, ...]:
        return tuple(c for c in self.components if not c.startswith(("tokenizer", "scheduler")))

    def check_memory(self, batch: int, height: int, width: int) -> None:
        """Refuse, before compiling, a call whose attention alone cannot fit in memory (see estimate_bytes)."""
        need = self.estimate_bytes(batch, height, width)
        have = available_memory()
        if have is not None and need > have:
            raise InputError(f"{height}x{width} at batch {batch} needs about {need / 2**30:.1f} GiB for the UNet's "
                             f"attention alone, more than the {have / 2**30:.1f} GiB available on "
                             f"{jax.devices()[0].platform}: use a smaller height/width or batch")

    def estimate_bytes(self, batch: int, height: int, width: int) -> int:
        """A lower bound of the compiled program's peak memory: the largest self-attention score matrix
        (2B x heads x tokens^2, float32), which the einsum kernel materialises; a flash kernel would not."""
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        heads = self.unet._heads()
        worst = 0
        for level, block in enumerate(self.unet.down_block_types):
            if "CrossAttn" in block:
                tokens = -(-h // 2 ** level) * -(-w // 2 ** level)
                worst = max(worst, 2 * batch * heads[level] * tokens * tokens * 4)
        return worst

    # ------------------------------------------------------------------ finishing a call
    def finish(self, outputs, params, jit: bool, start: int = 0, decode_trajectory: bool = False,
               check_finite: bool = True):
        """The call's output: non-finite results named by step (check_finite), the trajectory cut to the steps
        run, frames decoded if asked."""
        images, traj, diagnostics = outputs
        if check_finite:
            first_bad = np.asarray(diagnostics["first_nonfinite"]).reshape(-1)
            bad_steps = first_bad[first_bad >= 0]
            if bad_steps.size:
                raise NonFiniteError(f"the latents became NaN or inf at step {int(bad_steps.min()) - start + 1} of "
                                     f"the denoising (model call {int(bad_steps.min())}): the weights, inputs or "
                                     "dtype produce non-finite values (float16 overflow? try float32 or bfloat16); "
                                     "check_finite=False returns them anyway")
            if not bool(np.all(np.asarray(diagnostics["images_finite"]))):
                raise NonFiniteError("the VAE decoder produced NaN or inf from finite latents (float16 overflow in "
                                     "the decoder is known: decode in float32); check_finite=False returns them anyway")
        if traj is not None and start:
            traj = traj.steps(start, axis=1 if jit else 0)
        frames = self._decode_trajectory(params, traj, jit) if decode_trajectory and traj is not None else None
        return FlaxStableDiffusionPipelineOutput(images=images, trajectory=traj, frames=frames)

    def _decode_trajectory(self, params, traj, jit: bool) -> np.ndarray:
        x0 = traj.pred_original_samples
        vae_params = params["vae"] if not jit else jax.tree_util.tree_map(lambda x: x[0], params["vae"])
        if jit:  # [n_dev, T, per_dev, ...] -> [T, n_dev * per_dev, ...]
            x0 = jnp.swapaxes(x0, 0, 1).reshape((x0.shape[1], -1) + x0.shape[3:])
        return self.decode_frames(vae_params, x0)

    def decode_to_images(self, vae_params, latents):
        """The decoded images and whether they are all finite (one scalar for the host's check)."""
        images = self.decode_latents(vae_params, latents)
        return images, jnp.all(jnp.isfinite(images))

    # ------------------------------------------------------------------ decoding
    def decode_latents(self, vae_params, latents):
        """Latents (NCHW, scaled) -> images [B, H, W, 3] float32 in [0, 1]."""
        image = self.vae.apply({"params": vae_params}, latents / self.vae.scaling_factor, method=self.vae.decode)
        image = (image.astype(jnp.float32) / 2 + 0.5).clip(0, 1)
        return image.transpose(0, 2, 3, 1)

    def decode_frames(self, vae_params, latents, chunk_size: int = 8, progress: bool = True) -> np.ndarray:
        """Decode latent frames [T, B, C, h, w] to uint8 images [T, B, H, W, 3], a chunk at a time.

        Only one chunk of float images exists at once, so a 50-step, batch-8, 512x512 trajectory
        (400 frames, 315 MB as uint8) decodes on one accelerator.
        """
        latents = np.asarray(latents)
        t, b = latents.shape[:2]
        flat = latents.reshape((t * b,) + latents.shape[2:])
        n = flat.shape[0]
        chunks = []
        for start in tqdm(range(0, n, chunk_size), desc="decoding frames", unit="chunk", disable=not progress,
                          leave=False):
            part = flat[start:start + chunk_size]
            pad = chunk_size - part.shape[0]
            if pad:  # keep one compiled shape
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            chunks.append(np.asarray(_decode_uint8(self, vae_params, part))[: chunk_size - pad])
        frames = np.concatenate(chunks)
        return frames.reshape((t, b) + frames.shape[1:])


@functools.lru_cache(maxsize=32)
def _param_shapes(module, skip: tuple[str, ...] = ()):
    return module.param_shapes(skip)


def available_memory() -> int | None:
    """Bytes the default device can still use: the accelerator's limit, or the host's MemAvailable on CPU."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@functools.partial(jax.jit, static_argnums=0)
def _decode_uint8(pipe, vae_params, latents):
    return jnp.round(pipe.decode_latents(vae_params, latents) * 255).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------- loading
def open_pipeline_folder(pretrained_model_name_or_path, patterns, revision=None) -> tuple[Path, dict]:
    """(local folder, model_index.json) of a diffusers pipeline folder or hub repo id."""
    root = resolve_folder(pretrained_model_name_or_path, allow_patterns=patterns, revision=revision)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise SdjaxError(f"{root} is not a diffusers pipeline folder: model_index.json is missing")
    return root, read_json(index_path, "model_index.json")


def check_components(index: dict, index_path, supported: tuple[str, ...], pipeline_name: str) -> None:
    """Refuse a folder with components this pipeline would silently ignore."""
    extra = [k for k, v in index.items() if not k.startswith("_") and k not in supported
             and k not in SKIPPED_COMPONENTS and isinstance(v, list) and v and v[0] is not None]
    if extra:
        raise ConfigError(f"{index_path}: components {extra} are not run by sdjax's {pipeline_name} "
                          f"(it runs: {', '.join(supported)})")


def weight_patterns(components) -> list[str]:
    """What to download for a repo id: configs, tokenizer files and non-variant safetensors; never pickles."""
    pats = ["model_index.json"]
    for sub in components:
        if sub.startswith("tokenizer"):
            pats.append(f"{sub}/*")
        elif sub.startswith("scheduler"):
            pats.append(f"{sub}/*.json")
        else:
            pats += [f"{sub}/config.json", f"{sub}/diffusion_pytorch_model.safetensors", f"{sub}/model.safetensors",
                     f"{sub}/*.safetensors.index.json", f"{sub}/*-of-*.safetensors"]
    return pats


def runtime_for(model_cls, runtime: dict) -> dict:
    """The kernel choices (`attention_kernel`, `conv_kernel`) that `model_cls` has; unknown names are an error."""
    known = {"attention_kernel", "conv_kernel"}
    unknown = set(runtime) - known
    if unknown:
        raise TypeError(f"unknown argument(s) {sorted(unknown)}; kernel choices: {sorted(known)}")
    return {k: v for k, v in runtime.items() if k in model_cls.runtime_fields()}
