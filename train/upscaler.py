"""The toy cascade's second stage: a text- and image-conditioned super-resolution LDM (32x32 -> 64x64).

    sdjax train autoencoder --config shapes_upscaler_autoencoder --workdir runs/shapes_upscaler_autoencoder
    sdjax train upscaler    --config shapes_upscaler             --workdir runs/shapes_upscaler

The Latent Diffusion paper's super-resolution setup (Sec. 4.4) in diffusers' x4-upscaler layout: the UNet denoises
the latents of a 64x64 image under an f=2 autoencoder (32x32x4, stage 1 of this stage: the toy model's own
autoencoder code at 64x64) and sees the 32x32 low-resolution image concatenated to them on the channel axis
(4 + 3 = 7 input channels). The low-resolution image is the 64x64 training image area-downsampled by 2, noised to
a random level in [0, max_noise_level] by a DDPM forward process (noise augmentation: at sampling time a higher
level makes the model trust the input less, which is what a generated, imperfect input needs); that level is the
UNet's class label (a table of max_noise_level + 1 rows in diffusers' layout; trained here as a smooth function of
the level, sinusoids @ a learnt matrix, so that every level is trained by every sample; the table is that product,
written out at export). The text conditioning is the toy model's CLIP text encoder, frozen (its embeddings of every
caption are computed once); captions are dropped with probability caption_dropout for classifier-free guidance.

At the end the EMA weights are exported as a diffusers `StableDiffusionUpscalePipeline` folder (<workdir>/pipeline,
or export_dir), which `sdjax.FlaxStableDiffusionUpscalePipeline` and diffusers' PyTorch pipeline load. diffusers
decodes an upscaler's latents with the VAE scaling factor 0.08333 whatever the VAE's config says, so the exported
VAE is reparametrised (its quant_conv / post_quant_conv rescaled: the same decoder, latents multiplied by a
constant) so that 0.08333 is its true scaling factor.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax.errors import ConfigError
from sdjax.io import check_output_dir, read_json, write_json
from sdjax.models.autoencoder_kl import AutoencoderKL
from sdjax.models.clip_text import CLIPTextModel
from sdjax.models.embeddings import get_timestep_embedding
from sdjax.models.unet_2d_condition import UNet2DConditionModel
from sdjax.pipelines.upscale import UPSCALER_SCALING_FACTOR, FlaxStableDiffusionUpscalePipeline
from sdjax.schedulers import DDPMScheduler, get_scheduler
from sdjax.tokenizer import load_tokenizer

from . import data as data_lib
from . import ldm
from . import parallel
from . import tokenizer as tokenizer_lib
from .checkpointing import Checkpointer, check_or_write_config, prepare_workdir
from .config import LoopConfig, build_config, check_choice, check_ranges, to_jsonable
from .export import COMMAND as EXPORT_COMMAND, write_pipeline_folder
from .loop import Step, restore_or_init, run_steps
from .metrics import MetricsLog, plot_losses

logger = logging.getLogger(__name__)
COMMAND = "sdjax train upscaler"
LOW_RES_BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclasses.dataclass
class Config(LoopConfig):
    """The upscaler stage's keys and types; the values (defaults included) come from a config file (configs/)."""

    autoencoder_dir: str  # the f=2 autoencoder's workdir (its vae/ folder is used)
    text_model: str | None  # a pipeline folder whose text encoder and tokenizer are used, frozen; None: the toy model
    dataset: str
    image_size: int  # the high resolution; the low resolution is image_size / the autoencoder's factor
    num_train_images: int | None
    data_seed: int
    unet: dict  # UNet2DConditionModel keys (sample_size, in/out_channels, cross_attention_dim, num_class_embeds filled)
    prediction_type: str  # "epsilon" or "v_prediction"
    beta_schedule: str  # the latents' noise schedule: "scaled_linear", "cosine" or "linear"
    beta_start: float
    beta_end: float
    num_train_timesteps: int
    low_res_beta_schedule: str  # the low-resolution image's noise augmentation (the exported low_res_scheduler)
    low_res_beta_start: float
    low_res_beta_end: float
    max_noise_level: int  # augmentation levels are drawn from [0, max_noise_level]; the exported pipeline's limit
    caption_dropout: float
    ema_decay: float
    weight_decay: float
    sample_scheduler: str  # the exported pipeline's scheduler: "ddim" or "pndm"
    export_dir: str | None  # default: <workdir>/pipeline

    def validate(self) -> None:
        super().validate()
        UNet2DConditionModel.check_config_dict(self.unet, "config key 'unet'",
                                               filled=("sample_size", "in_channels", "out_channels",
                                                       "cross_attention_dim", "num_class_embeds"))
        check_choice(self, "prediction_type", ("epsilon", "v_prediction"))
        check_choice(self, "beta_schedule", tuple(ldm.BETA_SCHEDULES))
        check_choice(self, "low_res_beta_schedule", LOW_RES_BETA_SCHEDULES)
        check_choice(self, "sample_scheduler", ("ddim", "pndm"))
        check_ranges(self, at_least_one=("image_size", "num_train_timesteps", "num_train_images"),
                     non_negative=("weight_decay", "max_noise_level"), unit_interval=("caption_dropout", "ema_decay"))
        for prefix in ("", "low_res_"):
            start, end = getattr(self, f"{prefix}beta_start"), getattr(self, f"{prefix}beta_end")
            if not 0 < start < end < 1:
                raise ConfigError(f"{prefix}beta_start = {start}, {prefix}beta_end = {end}: "
                                  "need 0 < beta_start < beta_end < 1")
        if self.max_noise_level >= 1000:
            raise ConfigError(f"config key 'max_noise_level' = {self.max_noise_level}: must be < 1000 (the low-res "
                              "scheduler's training timesteps)")
        if self.num_train_images is not None and self.num_train_images < self.batch_size:
            raise ConfigError(f"config key 'num_train_images' = {self.num_train_images}: fewer than one batch "
                              f"(batch_size {self.batch_size})")


def low_res_scheduler_config(cfg: Config) -> dict:
    """The DDPM forward process that noises the low-resolution image (diffusers' low_res_scheduler)."""
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": cfg.low_res_beta_schedule,
            "beta_start": cfg.low_res_beta_start, "beta_end": cfg.low_res_beta_end, "clip_sample": False,
            "variance_type": "fixed_small"}


def text_model_path(cfg: Config) -> Path:
    if cfg.text_model is not None:
        return Path(cfg.text_model)
    from sdjax.assets import toy_model_path

    return toy_model_path()


def load_text_model(cfg: Config):
    """(text encoder, its params, tokenizer, tokenizer folder) of the pipeline folder `text_model`, used frozen."""
    root = text_model_path(cfg)
    if not (root / "text_encoder" / "config.json").is_file():
        raise ConfigError(f"config key 'text_model' = {str(root)!r}: not a pipeline folder with a text_encoder/")
    text_encoder, params = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    return text_encoder, params, load_tokenizer(root, subfolder="tokenizer"), root / "tokenizer"


def make_unet(cfg: Config, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> UNet2DConditionModel:
    f = vae.vae_scale_factor
    if cfg.image_size % f:
        raise ConfigError(f"image_size {cfg.image_size} is not a multiple of the autoencoder's factor {f}")
    return UNet2DConditionModel.from_config(dict(cfg.unet) | dict(
        sample_size=cfg.image_size // f, in_channels=vae.latent_channels + 3, out_channels=vae.latent_channels,
        cross_attention_dim=text_encoder.hidden_size, num_class_embeds=cfg.max_noise_level + 1))


def downsample(images_uint8: np.ndarray, factor: int) -> np.ndarray:
    """Area downsampling (the mean of each factor x factor block): [N, H, W, 3] uint8 -> [N, H/f, W/f, 3] uint8."""
    n, h, w, c = images_uint8.shape
    blocks = images_uint8.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float32)
    return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(text_encoder, params, ids):
    return text_encoder.apply({"params": params}, ids).last_hidden_state


def caption_contexts(text_encoder, params, tokenizer, captions) -> tuple[np.ndarray, np.ndarray, int]:
    """The frozen text encoder's output for every distinct caption and for "": (table [K+1, L, D], index of each
    caption in the table [N], index of "")."""
    distinct = sorted(set(captions) | {""})
    table = np.asarray(_encode_text(text_encoder, params, jnp.asarray(tokenizer_lib.encode(tokenizer, distinct))))
    where = {c: i for i, c in enumerate(distinct)}
    return table, np.array([where[c] for c in captions], np.int32), where[""]


LEVEL_FEATURES = 64  # sinusoids of the noise level that the class-embedding table is a linear function of
LEVEL_MIN_PERIOD = 40  # levels: their fastest sinusoid's period, so that neighbouring levels embed alike


def level_table(cfg: Config, level_proj):
    """The UNet's class-embedding table [max_noise_level + 1, D]: sinusoids of each level @ level_proj [F, D].
    The sinusoids' periods are log-spaced from LEVEL_MIN_PERIOD levels up to twice the level range (not from one
    level, as a timestep embedding's: that would make neighbouring levels unrelated)."""
    n = cfg.max_noise_level + 1
    levels = jnp.arange(n, dtype=jnp.float32)
    lo, hi = 0.5, max(1.0, n / LEVEL_MIN_PERIOD)  # cycles over the level range
    phase = levels * (2 * math.pi * hi / n)
    return get_timestep_embedding(phase, LEVEL_FEATURES, flip_sin_to_cos=True, downscale_freq_shift=0,
                                  max_period=hi / lo) @ level_proj


def unet_params(cfg: Config, params) -> dict:
    """The UNet's params in diffusers' layout: the trained tree plus the class-embedding table it parametrises."""
    return {**params["unet"], "class_embedding": {"embedding": level_table(cfg, params["level_proj"])}}


def create_train_state(cfg: Config, unet):
    full = unet.init_weights(jax.random.PRNGKey(cfg.seed))
    dim = full["class_embedding"]["embedding"].shape[1]
    level_proj = jax.random.normal(jax.random.PRNGKey(cfg.seed + 1), (LEVEL_FEATURES, dim)) / math.sqrt(LEVEL_FEATURES)
    params = {"unet": {k: v for k, v in full.items() if k != "class_embedding"}, "level_proj": level_proj}
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": ldm.make_optimizer(cfg).init(params),
            "ema": jax.tree_util.tree_map(jnp.copy, params)}


def train_step(cfg: Config, unet, noise_sched, low_res_sched, scaling_factor, state, batch, key):
    """One step: a posterior sample of the latents, the low-resolution image noised to a random level (the class
    label), captions dropped, the latents noised, the UNet on [latents; image], MSE; AdamW; EMA."""
    mean, std = batch["latent_mean"], batch["latent_std"]
    b = mean.shape[0]
    k_z, k_noise, k_t, k_level, k_low, k_drop = jax.random.split(key, 6)
    z = (mean + std * jax.random.normal(k_z, mean.shape)) * scaling_factor
    low = batch["low_res"].astype(jnp.float32) / 127.5 - 1.0  # uint8 NHWC -> [-1, 1]
    low = jnp.transpose(low, (0, 3, 1, 2))
    level = jax.random.randint(k_level, (b,), 0, cfg.max_noise_level + 1)
    low = low_res_sched.add_noise(low, jax.random.normal(k_low, low.shape), level)
    drop = jax.random.uniform(k_drop, (b,)) < cfg.caption_dropout
    context = jnp.where(drop[:, None, None], batch["empty_context"][None], batch["context"])
    noise = jax.random.normal(k_noise, z.shape)
    t = jax.random.randint(k_t, (b,), 0, cfg.num_train_timesteps)
    noisy = noise_sched.add_noise(z, noise, t)
    target = noise if cfg.prediction_type == "epsilon" else noise_sched.get_velocity(z, noise, t)

    def loss_fn(params):
        pred = unet.apply({"params": unet_params(cfg, params)}, jnp.concatenate([noisy, low], axis=1), t, context,
                          class_labels=level)
        return jnp.mean((pred - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = ldm.make_optimizer(cfg).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    decay = jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
    return {"step": step, "params": params, "opt_state": opt_state, "ema": ema}, {"loss": loss,
                                                                                "grad_norm": optax.tree.norm(grads)}


def rescale_vae(vae: AutoencoderKL, params: dict, scaling_factor: float, target: float = UPSCALER_SCALING_FACTOR):
    """The same autoencoder with latents multiplied by c = scaling_factor / target, so that `target` is its true
    scaling factor: quant_conv's mean outputs x c (its log-variance outputs + 2 log c), post_quant_conv's kernel / c.
    Decoding z' = c z gives what decoding z gave; encoding gives c times the old posterior."""
    if not (vae.use_quant_conv and vae.use_post_quant_conv):
        raise ConfigError("the upscaler's autoencoder needs quant_conv and post_quant_conv (to rescale its latents)")
    c = scaling_factor / target
    n = vae.latent_channels
    params = jax.tree_util.tree_map(np.array, params)  # copies
    q = params["quant_conv"]
    q["kernel"][..., :n] *= c
    q["bias"][:n] *= c
    q["bias"][n:] += 2 * math.log(c)
    params["post_quant_conv"]["kernel"] /= c
    return vae.clone(scaling_factor=target), params


def export_upscaler(out_dir, text_encoder, te_params, tokenizer, tokenizer_dir, unet, unet_params, vae, vae_params,
                    cfg: Config, dtype=jnp.float32, overwrite: bool = False, protect=()):
    """Write a diffusers StableDiffusionUpscalePipeline folder (the VAE reparametrised to diffusers' 0.08333)."""
    vae_out, vae_params_out = rescale_vae(vae, jax.device_get(vae_params), vae.scaling_factor)
    pipe = FlaxStableDiffusionUpscalePipeline(
        text_encoder, vae_out, unet, tokenizer, get_scheduler(ldm.sampling_scheduler_config(cfg)),
        get_scheduler(low_res_scheduler_config(cfg)), max_noise_level=cfg.max_noise_level)
    params = {"text_encoder": te_params, "vae": vae_params_out, "unet": unet_params}
    return write_pipeline_folder(out_dir, pipe, params, tokenizer_dir, dtype=dtype, overwrite=overwrite,
                                 protect=protect)


def train_and_evaluate(cfg: Config, workdir, until_step: int | None = None, progress: bool = True,
                       final_save: bool = True, export: bool = True) -> dict:
    workdir = prepare_workdir(workdir, COMMAND)
    if export and cfg.export_dir:  # checked now, not after the training
        check_output_dir(cfg.export_dir, EXPORT_COMMAND, protect=(workdir, cfg.autoencoder_dir))
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    check_or_write_config(workdir, to_jsonable(cfg), resumable=ckpt.latest_step() is not None)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(cfg.batch_size, mesh)

    vae, vae_params = ldm.load_autoencoder(cfg.autoencoder_dir)
    text_encoder, te_params, tokenizer, tokenizer_dir = load_text_model(cfg)
    unet = make_unet(cfg, vae, text_encoder)
    ds = data_lib.load_dataset(cfg.dataset, cfg.num_train_images, cfg.image_size, cfg.data_seed)
    low_res = downsample(ds.images, vae.vae_scale_factor)
    contexts, caption_index, empty = caption_contexts(text_encoder, te_params, tokenizer, ds.captions)
    lat_mean, lat_std = ldm.cached_latents(workdir, vae, vae_params, ds)
    noise_sched = DDPMScheduler.from_config(ldm.noise_schedule_config(cfg))
    low_res_sched = get_scheduler(low_res_scheduler_config(cfg))

    state, start = restore_or_init(ckpt, lambda: create_train_state(cfg, unet), mesh)
    log = MetricsLog(workdir / "metrics.jsonl", start)

    def make_batch(step):
        idx = data_lib.batch_indices(len(ds), cfg.batch_size, cfg.data_seed, step)
        batch = {"latent_mean": lat_mean[idx], "latent_std": lat_std[idx], "low_res": low_res[idx],
                 "context": contexts[caption_index[idx]]}
        sharded = parallel.shard_batch(batch, mesh)
        sharded["empty_context"] = parallel.replicate(contexts[empty], mesh)
        return sharded

    step = Step(train_step, mesh, cfg, unet, noise_sched, low_res_sched, float(vae.scaling_factor))
    state, summary = run_steps(cfg, state, start, step, make_batch, ckpt, log, desc="upscaler",
                               until_step=until_step, final_save=final_save, progress=progress)
    if summary["steps"] < cfg.num_steps:
        return summary
    rows = log.rows()
    tail = [r["loss"] for r in rows[-5:]]
    summary["final_loss_mean_last_5_logs"] = float(np.mean(tail)) if tail else None
    plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", keys=("loss", "grad_norm"),
                title=f"upscaler {cfg.image_size // vae.vae_scale_factor} -> {cfg.image_size} ({cfg.prediction_type})")
    if export:
        out = Path(cfg.export_dir) if cfg.export_dir else workdir / "pipeline"
        export_upscaler(out, text_encoder, te_params, tokenizer, tokenizer_dir, unet,
                        jax.device_get(unet_params(cfg, state["ema"])), vae, vae_params, cfg,
                        overwrite=not cfg.export_dir,
                        protect=(workdir, cfg.autoencoder_dir))
        summary["pipeline"] = str(out)
    write_json(workdir / "summary.json", summary)
    logger.info("upscaler: %s", summary)
    return summary


def is_upscaler_workdir(workdir) -> bool:
    from sdjax.io import OUTPUT_MARKER

    marker = Path(workdir) / OUTPUT_MARKER
    return marker.is_file() and read_json(marker).get("command") == COMMAND


def export_from_workdir(workdir, out_dir, dtype=jnp.float32, use_ema: bool = True, overwrite: bool = False):
    """Rebuild the models from an upscaler workdir's config and latest checkpoint, and export them."""
    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise ConfigError(f"{workdir} is not an upscaler workdir: it has no config.json (sdjax train upscaler)")
    check_output_dir(out_dir, EXPORT_COMMAND, overwrite=overwrite, protect=(workdir,))
    cfg = build_config(Config, read_json(workdir / "config.json"), source=str(workdir / "config.json"))
    vae, vae_params = ldm.load_autoencoder(cfg.autoencoder_dir)
    text_encoder, te_params, tokenizer, tokenizer_dir = load_text_model(cfg)
    unet = make_unet(cfg, vae, text_encoder)
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    if ckpt.latest_step() is None:
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints: nothing to export yet")
    state = ckpt.restore(jax.eval_shape(lambda: create_train_state(cfg, unet)))
    ckpt.close()
    params = unet_params(cfg, state["ema"] if use_ema else state["params"])
    return export_upscaler(out_dir, text_encoder, te_params, tokenizer, tokenizer_dir, unet, jax.device_get(params),
                           vae, vae_params, cfg, dtype=dtype, overwrite=overwrite, protect=(workdir, cfg.autoencoder_dir))

