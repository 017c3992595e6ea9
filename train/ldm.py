"""Stage 2: a text-conditioned UNet on the frozen autoencoder's latents, as in Latent Diffusion.

    sdjax train ldm --config shapes_ldm --workdir runs/shapes_ldm

Reads stage 1's VAE from <autoencoder_dir>/vae (its config holds the latent scaling factor), encodes
the training images once (posterior mean and std, cached in <workdir>/latents.npz; a fresh posterior
sample is drawn every step), builds a CLIP BPE tokenizer from the captions, and trains sdjax's
UNet2DConditionModel jointly with a small CLIP text encoder (the paper trains its conditioning
encoder too). Captions are dropped (replaced by "") with probability caption_dropout, which makes
classifier-free guidance possible. epsilon or v prediction; scaled-linear or cosine betas; EMA
weights; data parallel over all devices (batch split, params replicated). At the end the EMA weights
are exported as a diffusers-format pipeline folder (<workdir>/pipeline, or export_dir).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax.errors import ConfigError
from sdjax.io import check_output_dir, read_json, write_json
from sdjax.models.autoencoder_kl import AutoencoderKL
from sdjax.models.clip_text import CLIPTextModel
from sdjax.models.unet_2d_condition import UNet2DConditionModel
from sdjax.schedulers import DDPMScheduler, get_scheduler

from . import data as data_lib
from . import parallel
from . import tokenizer as tokenizer_lib
from .checkpointing import Checkpointer, check_or_write_config, prepare_workdir
from .config import LoopConfig, build_config, check_choice, check_ranges, to_jsonable
from .export import COMMAND as EXPORT_COMMAND, export_pipeline
from .loop import Step, ema_update, restore_or_init, run_steps
from .metrics import MetricsLog, plot_losses

logger = logging.getLogger(__name__)

BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2", "linear": "linear"}


@dataclasses.dataclass
class Config(LoopConfig):
    """Stage 2's keys and types; the values (defaults included) come from a config file (configs/)."""

    autoencoder_dir: str  # stage 1's workdir (its vae/ folder is used)
    dataset: str
    image_size: int
    num_train_images: int | None
    data_seed: int
    model_max_length: int  # tokens per caption (= the text encoder's max_position_embeddings)
    unet: dict  # UNet2DConditionModel config keys (sample_size, in/out_channels, cross_attention_dim filled in)
    text_encoder: dict  # CLIPTextConfig keys (vocab_size, max_position_embeddings, special token ids filled in)
    prediction_type: str  # "epsilon" or "v_prediction"
    beta_schedule: str  # "scaled_linear", "cosine" or "linear"
    beta_start: float
    beta_end: float
    num_train_timesteps: int
    caption_dropout: float
    ema_decay: float
    weight_decay: float
    sample_scheduler: str  # the exported pipeline's scheduler: "ddim" or "pndm"
    export_dir: str | None  # default: <workdir>/pipeline

    def validate(self) -> None:
        super().validate()
        UNet2DConditionModel.check_config_dict(self.unet, "config key 'unet'",
                                               filled=("sample_size", "in_channels", "out_channels",
                                                       "cross_attention_dim"))
        CLIPTextModel.check_config_dict(self.text_encoder, "config key 'text_encoder'",
                                        filled=("vocab_size", "max_position_embeddings", "bos_token_id",
                                                "eos_token_id", "pad_token_id", "projection_dim"))
        check_choice(self, "prediction_type", ("epsilon", "v_prediction"))
        check_choice(self, "beta_schedule", tuple(BETA_SCHEDULES))
        check_choice(self, "sample_scheduler", ("ddim", "pndm"))
        check_ranges(self, at_least_one=("image_size", "model_max_length", "num_train_timesteps", "num_train_images"),
                     non_negative=("weight_decay",), unit_interval=("caption_dropout", "ema_decay"))
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"beta_start = {self.beta_start}, beta_end = {self.beta_end}: "
                              "need 0 < beta_start < beta_end < 1")
        if self.num_train_images is not None and self.num_train_images < self.batch_size:
            raise ConfigError(f"config key 'num_train_images' = {self.num_train_images}: fewer than one batch "
                              f"(batch_size {self.batch_size})")


def noise_schedule_config(cfg: Config) -> dict:
    """The training betas, as diffusers scheduler config keys."""
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=BETA_SCHEDULES[cfg.beta_schedule],
                beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type)


def sampling_scheduler_config(cfg: Config) -> dict:
    """DDIM / PLMS with the training betas, set up as Stable Diffusion's (for diffusers and sdjax alike)."""
    common = noise_schedule_config(cfg) | dict(set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    if cfg.sample_scheduler == "ddim":
        return {"_class_name": "DDIMScheduler", **common, "clip_sample": False}
    return {"_class_name": "PNDMScheduler", **common, "skip_prk_steps": True}


def load_autoencoder(autoencoder_dir) -> tuple[AutoencoderKL, dict]:
    folder = Path(autoencoder_dir) / "vae"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"no trained autoencoder in {folder}: run stage 1 (sdjax train autoencoder) first, "
                          f"or set autoencoder_dir")
    return AutoencoderKL.from_pretrained(folder)


def make_models(cfg: Config, vae: AutoencoderKL, tokenizer):
    f = vae.vae_scale_factor
    if cfg.image_size % f:
        raise ConfigError(f"image_size {cfg.image_size} is not a multiple of the autoencoder's factor {f}")
    te_cfg = dict(cfg.text_encoder) | dict(
        vocab_size=len(tokenizer), max_position_embeddings=cfg.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_encoder.get("hidden_size", 64))
    text_encoder = CLIPTextModel.from_config(te_cfg)
    unet_cfg = dict(cfg.unet) | dict(sample_size=cfg.image_size // f, in_channels=vae.latent_channels,
                                     out_channels=vae.latent_channels, cross_attention_dim=text_encoder.hidden_size)
    return text_encoder, UNet2DConditionModel.from_config(unet_cfg)


def make_optimizer(cfg: Config):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                                  max(cfg.num_steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def create_train_state(cfg: Config, text_encoder, unet):
    key = jax.random.PRNGKey(cfg.seed)
    params = {"unet": unet.init_weights(jax.random.fold_in(key, 0)),
              "text_encoder": text_encoder.init_weights(jax.random.fold_in(key, 1))}
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": make_optimizer(cfg).init(params),
            "ema": jax.tree_util.tree_map(jnp.copy, params)}  # own buffers: the state is donated


def noised_batch(key, batch, scaling_factor, noise_sched, num_train_timesteps: int, prediction_type: str,
                 caption_dropout: float):
    """The LDM objective's inputs for a batch of cached posteriors (batch["latent_mean"], batch["latent_std"]):
    (captions to drop [B] bool, timesteps [B], noised latents, target: the noise or the velocity). z is sampled from
    the posterior and scaled; the key splits into (z, noise, t, drop) as every trainer here has always used it."""
    mean, std = batch["latent_mean"], batch["latent_std"]
    b = mean.shape[0]
    k_z, k_noise, k_t, k_drop = jax.random.split(key, 4)
    z = (mean + std * jax.random.normal(k_z, mean.shape)) * scaling_factor
    drop = jax.random.uniform(k_drop, (b,)) < caption_dropout
    noise = jax.random.normal(k_noise, z.shape)
    t = jax.random.randint(k_t, (b,), 0, num_train_timesteps)
    noisy = noise_sched.add_noise(z, noise, t)
    target = noise if prediction_type == "epsilon" else noise_sched.get_velocity(z, noise, t)
    return drop, t, noisy, target


def train_step(cfg: Config, text_encoder, unet, noise_sched, scaling_factor, empty_ids, state, batch, key):
    """One step: sample z from the cached posterior, drop captions, noise, predict, MSE; AdamW; EMA."""
    drop, t, noisy, target = noised_batch(key, batch, scaling_factor, noise_sched, cfg.num_train_timesteps,
                                          cfg.prediction_type, cfg.caption_dropout)
    ids = jnp.where(drop[:, None], empty_ids[None, :], batch["input_ids"])

    def loss_fn(params):
        context = text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
        pred = unet.apply({"params": params["unet"]}, noisy, t, context)
        return jnp.mean((pred - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = make_optimizer(cfg).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    ema = ema_update(state["ema"], params, step, cfg.ema_decay)
    return {"step": step, "params": params, "opt_state": opt_state, "ema": ema}, {"loss": loss,
                                                                                "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnums=0)
def _posterior(vae, vae_params, x):
    posterior = vae.apply({"params": vae_params}, x, method=vae.encode)
    return posterior.mean, posterior.std


def encode_dataset(vae, vae_params, images_uint8, batch_size: int = 256):
    """Posterior (mean, std) of every image: [N, C, h, w] float32 each."""
    means, stds = [], []
    for i in range(0, len(images_uint8), batch_size):
        m, s = _posterior(vae, vae_params, data_lib.to_model_input(images_uint8[i:i + batch_size]))
        means.append(np.asarray(m))
        stds.append(np.asarray(s))
    return np.concatenate(means), np.concatenate(stds)


def cached_latents(workdir: Path, vae, vae_params, ds) -> tuple[np.ndarray, np.ndarray]:
    """Encode once; later runs in the same workdir read latents.npz (keyed by the VAE weights and data)."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(vae_params):
        h.update(np.asarray(leaf).tobytes())
    h.update(ds.images.tobytes())
    digest = h.hexdigest()[:16]
    path = workdir / "latents.npz"
    if path.is_file():
        cached = np.load(path)
        if str(cached["digest"]) == digest:
            return cached["mean"], cached["std"]
    mean, std = encode_dataset(vae, vae_params, ds.images)
    tmp = workdir / "latents.tmp.npz"
    np.savez(tmp, mean=mean, std=std, digest=np.array(digest))
    tmp.replace(path)
    return mean, std


def setup_tokenizer(workdir: Path, captions, model_max_length: int, rebuild: bool = False):
    """The run's tokenizer: built from the captions when the run starts (rebuild), reused when it resumes."""
    folder = workdir / "tokenizer"
    if rebuild or not (folder / "vocab.json").is_file():
        tokenizer_lib.build_clip_tokenizer(sorted(set(captions)), folder, model_max_length)
    return tokenizer_lib.load(folder)


def train_and_evaluate(cfg: Config, workdir, until_step: int | None = None, progress: bool = True,
                       final_save: bool = True, export: bool = True) -> dict:
    workdir = prepare_workdir(workdir, "sdjax train ldm")
    if export and cfg.export_dir:  # checked now, not after the training
        check_output_dir(cfg.export_dir, EXPORT_COMMAND, protect=(workdir, cfg.autoencoder_dir))
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    resumable = ckpt.latest_step() is not None
    check_or_write_config(workdir, to_jsonable(cfg), resumable)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(cfg.batch_size, mesh)

    vae, vae_params = load_autoencoder(cfg.autoencoder_dir)
    ds = data_lib.load_dataset(cfg.dataset, cfg.num_train_images, cfg.image_size, cfg.data_seed)
    tokenizer = setup_tokenizer(workdir, ds.captions, cfg.model_max_length, rebuild=not resumable)
    text_encoder, unet = make_models(cfg, vae, tokenizer)
    input_ids = tokenizer_lib.encode(tokenizer, ds.captions)
    empty_ids = jnp.asarray(tokenizer_lib.encode(tokenizer, [""])[0])
    lat_mean, lat_std = cached_latents(workdir, vae, vae_params, ds)
    noise_sched = DDPMScheduler.from_config(noise_schedule_config(cfg))

    state, start = restore_or_init(ckpt, lambda: create_train_state(cfg, text_encoder, unet), mesh)
    log = MetricsLog(workdir / "metrics.jsonl", start)

    def make_batch(step):
        idx = data_lib.batch_indices(len(ds), cfg.batch_size, cfg.data_seed, step)
        return parallel.shard_batch({"latent_mean": lat_mean[idx], "latent_std": lat_std[idx],
                                     "input_ids": input_ids[idx]}, mesh)

    step = Step(train_step, mesh, cfg, text_encoder, unet, noise_sched, float(vae.scaling_factor), empty_ids)
    state, summary = run_steps(cfg, state, start, step, make_batch, ckpt, log, desc="ldm",
                               until_step=until_step, final_save=final_save, progress=progress)
    if summary["steps"] < cfg.num_steps or not parallel.is_primary():  # process 0 evaluates and writes
        return summary
    rows = log.rows()
    tail = [r["loss"] for r in rows[-5:]]
    summary["final_loss_mean_last_5_logs"] = float(np.mean(tail)) if tail else None
    plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", keys=("loss", "grad_norm"),
                title=f"LDM ({cfg.prediction_type}, {cfg.beta_schedule} betas)")
    if export:
        out = Path(cfg.export_dir) if cfg.export_dir else workdir / "pipeline"
        export_pipeline(out, text_encoder, unet, jax.device_get(state["ema"]), vae, vae_params, tokenizer,
                        get_scheduler(sampling_scheduler_config(cfg)), overwrite=not cfg.export_dir,
                        protect=(workdir, cfg.autoencoder_dir))
        summary["pipeline"] = str(out)
    write_json(workdir / "summary.json", summary)
    logger.info("ldm: %s", summary)
    return summary


def export_from_workdir(workdir, out_dir, dtype=jnp.float32, use_ema: bool = True, overwrite: bool = False):
    """Rebuild the models from a stage-2 workdir's config and latest checkpoint, and export them."""
    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise ConfigError(f"{workdir} is not a stage-2 workdir: it has no config.json (train it with sdjax train ldm)")
    check_output_dir(out_dir, EXPORT_COMMAND, overwrite=overwrite, protect=(workdir,))  # before any work
    cfg = build_config(Config, read_json(workdir / "config.json"), source=str(workdir / "config.json"))
    vae, vae_params = load_autoencoder(cfg.autoencoder_dir)
    tokenizer = setup_tokenizer(workdir, [], cfg.model_max_length)
    text_encoder, unet = make_models(cfg, vae, tokenizer)
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    if ckpt.latest_step() is None:
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints: nothing to export yet")
    state = ckpt.restore(jax.eval_shape(lambda: create_train_state(cfg, text_encoder, unet)))
    ckpt.close()
    params = state["ema"] if use_ema else state["params"]
    return export_pipeline(out_dir, text_encoder, unet, jax.device_get(params), vae, vae_params, tokenizer,
                           get_scheduler(sampling_scheduler_config(cfg)), dtype=dtype, overwrite=overwrite,
                           protect=(workdir, cfg.autoencoder_dir))
