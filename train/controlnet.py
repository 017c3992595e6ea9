"""A toy ControlNet on the shipped shapes model: "where, and what shape" from a silhouette.

    sdjax train controlnet --config shapes_controlnet --workdir runs/shapes_controlnet

The method of Zhang et al. (2023), at toy scale: a trainable copy of the frozen UNet's encoder
(`ControlNetModel.from_unet`: conv_in, time embedding, down blocks and mid block copied, a small conditioning
embedding for the control image) joined to the frozen UNet through zero convolutions, so that training starts
from exactly the base model. The control image is the shape's silhouette (white on black, at the shape's
position and size, from the shapes generator: `data.shapes_silhouette_example`); the caption is the image's own
(replaced by "" with probability caption_dropout, so the ControlNet also works on CFG's unconditional half).
The base UNet, text encoder and VAE (`base_model`, default the shipped toy model) are frozen: latents are
encoded once (posterior mean and std cached in <workdir>/latents.npz, a fresh sample drawn every step) and the
54 captions' text embeddings computed once. Loss: the base model's objective (epsilon or v, read from its
scheduler) with the ControlNet's residuals added to the UNet. EMA weights, data parallel over all devices,
resumable (Orbax). At the end the EMA ControlNet is written as a diffusers ControlNet folder (<workdir>/controlnet,
or export_dir) that diffusers' `ControlNetModel.from_pretrained` and sdjax load.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax.errors import ConfigError
from sdjax.io import check_output_dir, write_folder, write_json
from sdjax.models.controlnet import ControlNetModel, check_compatible
from sdjax.pipelines import FlaxStableDiffusionPipeline
from sdjax.schedulers import DDPMScheduler

from . import data as data_lib
from . import parallel
from .checkpointing import Checkpointer, check_or_write_config, prepare_workdir
from .config import LoopConfig, check_ranges, to_jsonable
from .ldm import cached_latents, noised_batch
from .loop import Step, ema_update, restore_or_init, run_steps
from .metrics import MetricsLog, plot_losses

logger = logging.getLogger(__name__)

EXPORT_COMMAND = "sdjax train controlnet (export)"


@dataclasses.dataclass
class Config(LoopConfig):
    """The toy ControlNet's keys and types; the values (defaults included) come from a config file (configs/)."""

    base_model: str | None  # the frozen pipeline folder (None: the shipped toy model)
    num_train_images: int
    data_seed: int
    conditioning_embedding_out_channels: list  # widths of the control image's embedding: the VAE factor = 2 ** (len - 1)
    caption_dropout: float
    ema_decay: float
    weight_decay: float
    export_dir: str | None  # default: <workdir>/controlnet

    def validate(self) -> None:
        super().validate()
        check_ranges(self, at_least_one=("num_train_images",), non_negative=("weight_decay",),
                     unit_interval=("caption_dropout", "ema_decay"))
        widths = self.conditioning_embedding_out_channels
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ConfigError(f"config key 'conditioning_embedding_out_channels' = {widths!r}: must be a list of "
                              "whole numbers >= 1")
        if self.num_train_images < self.batch_size:
            raise ConfigError(f"config key 'num_train_images' = {self.num_train_images}: fewer than one batch "
                              f"(batch_size {self.batch_size})")


def load_base(cfg: Config):
    """(pipeline, params) of the frozen base model."""
    from sdjax.assets import toy_model_path

    return FlaxStableDiffusionPipeline.from_pretrained(cfg.base_model or toy_model_path())


def make_controlnet(cfg: Config, pipe, params):
    """A ControlNet for the base UNet (weights copied from it, zero convolutions zero), its control image at the
    output size: the conditioning embedding must downsample by the VAE's factor."""
    factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    if factor != pipe.vae_scale_factor:
        raise ConfigError(f"config key 'conditioning_embedding_out_channels' = {cfg.conditioning_embedding_out_channels}"
                          f" downsamples the control image {factor}x, the base model's VAE {pipe.vae_scale_factor}x: "
                          f"give {int(np.log2(pipe.vae_scale_factor)) + 1} widths")
    controlnet, cn_params = ControlNetModel.from_unet(
        pipe.unet, params["unet"], conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels),
        rng=jax.random.PRNGKey(cfg.seed))
    check_compatible(controlnet, pipe.unet)
    return controlnet, cn_params


def training_data(cfg: Config, image_size: int):
    """(dataset with labels, silhouettes [N, H, W] uint8): shapes images 0 .. n-1 of data_seed."""
    ds = data_lib.shapes_dataset(cfg.num_train_images, cfg.data_seed, image_size)
    silhouettes = np.stack([data_lib.shapes_silhouette_example(cfg.data_seed, i, image_size)[1]
                            for i in range(cfg.num_train_images)])
    return ds, silhouettes


def caption_table(pipe, params):
    """The 54 captions and "" (last) -> (text embeddings [55, L, D], {caption: row})."""
    captions = [c for _, c in data_lib.all_shape_captions()] + [""]
    context = _encode(pipe, params["text_encoder"], jnp.asarray(pipe.prepare_inputs(captions)))
    return np.asarray(context), {c: i for i, c in enumerate(captions)}


@functools.partial(jax.jit, static_argnums=0)
def _encode(pipe, te_params, ids):
    return pipe.text_encoder.apply({"params": te_params}, ids).last_hidden_state


def make_optimizer(cfg: Config):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                                  max(cfg.num_steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def create_train_state(cfg: Config, cn_params, unet_params, contexts):
    """The ControlNet's params, optimiser state and EMA, plus the frozen parts the step reads (`frozen`: the base
    UNet's params and the caption embeddings; never updated, carried in the state so the step takes no constants)."""
    params = jax.tree_util.tree_map(jnp.asarray, cn_params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": make_optimizer(cfg).init(params),
            "ema": jax.tree_util.tree_map(jnp.copy, params),
            "frozen": {"unet": jax.tree_util.tree_map(jnp.asarray, unet_params), "contexts": jnp.asarray(contexts)}}


def train_step(cfg: Config, controlnet, unet, noise_sched, scaling_factor, empty_row, state, batch, key):
    """One step: z from the cached posterior, captions dropped, noise, ControlNet residuals into the frozen UNet,
    the base objective; AdamW on the ControlNet only; EMA."""
    drop, t, noisy, target = noised_batch(key, batch, scaling_factor, noise_sched, noise_sched.num_train_timesteps,
                                          noise_sched.config["prediction_type"], cfg.caption_dropout)
    context = state["frozen"]["contexts"][jnp.where(drop, empty_row, batch["caption"])]
    control = jnp.repeat(batch["silhouette"][:, None].astype(jnp.float32) / 255.0, 3, axis=1)  # [B, 3, H, W] in [0, 1]
    unet_params = state["frozen"]["unet"]

    def loss_fn(params):
        down, mid = controlnet.apply({"params": params}, noisy, t, context, control, return_dict=False)
        pred = unet.apply({"params": unet_params}, noisy, t, context, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)
        return jnp.mean((pred - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = make_optimizer(cfg).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    ema = ema_update(state["ema"], params, step, cfg.ema_decay)
    new = {"step": step, "params": params, "opt_state": opt_state, "ema": ema, "frozen": state["frozen"]}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def noise_scheduler(pipe) -> DDPMScheduler:
    """The base model's training noise schedule (betas and prediction type from its scheduler config)."""
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "trained_betas")
    return DDPMScheduler.from_config({k: v for k, v in pipe.scheduler.config.items() if k in keys})


def export_controlnet(out_dir, controlnet, params, overwrite: bool = False, protect=()) -> Path:
    """Write a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors), swapped in whole."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, EXPORT_COMMAND, overwrite=overwrite, protect=protect)

    def fill(tmp):
        controlnet.save_pretrained(tmp, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params))

    return write_folder(out_dir, EXPORT_COMMAND, fill)


def train_and_evaluate(cfg: Config, workdir, until_step: int | None = None, progress: bool = True,
                       final_save: bool = True, export: bool = True) -> dict:
    workdir = prepare_workdir(workdir, "sdjax train controlnet")
    if export and cfg.export_dir:  # checked now, not after the training
        check_output_dir(cfg.export_dir, EXPORT_COMMAND, protect=(workdir,))
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    resumable = ckpt.latest_step() is not None
    check_or_write_config(workdir, to_jsonable(cfg), resumable)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(cfg.batch_size, mesh)

    pipe, base_params = load_base(cfg)
    controlnet, cn_params = make_controlnet(cfg, pipe, base_params)
    ds, silhouettes = training_data(cfg, pipe.default_size)
    contexts, row_of = caption_table(pipe, base_params)
    rows = np.array([row_of[c] for c in ds.captions], np.int32)
    lat_mean, lat_std = cached_latents(workdir, pipe.vae, base_params["vae"], ds)
    noise_sched = noise_scheduler(pipe)

    state, start = restore_or_init(
        ckpt, lambda: create_train_state(cfg, cn_params, base_params["unet"], contexts), mesh)
    log = MetricsLog(workdir / "metrics.jsonl", start)

    def make_batch(step):
        idx = data_lib.batch_indices(len(ds), cfg.batch_size, cfg.data_seed, step)
        return parallel.shard_batch({"latent_mean": lat_mean[idx], "latent_std": lat_std[idx], "caption": rows[idx],
                                     "silhouette": silhouettes[idx]}, mesh)

    step = Step(train_step, mesh, cfg, controlnet, pipe.unet, noise_sched, float(pipe.vae.scaling_factor),
                row_of[""])
    state, summary = run_steps(cfg, state, start, step, make_batch, ckpt, log, desc="controlnet",
                               until_step=until_step, final_save=final_save, progress=progress)
    if summary["steps"] < cfg.num_steps:
        return summary
    rows_logged = log.rows()
    tail = [r["loss"] for r in rows_logged[-5:]]
    summary["final_loss_mean_last_5_logs"] = float(np.mean(tail)) if tail else None
    plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", keys=("loss", "grad_norm"),
                title="toy ControlNet (silhouette) on the frozen shapes model")
    if export:
        out = Path(cfg.export_dir) if cfg.export_dir else workdir / "controlnet"
        export_controlnet(out, controlnet, jax.device_get(state["ema"]), overwrite=not cfg.export_dir,
                          protect=(workdir,))
        summary["controlnet"] = str(out)
    write_json(workdir / "summary.json", summary)
    logger.info("controlnet: %s", summary)
    return summary
