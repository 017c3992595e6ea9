"""Stage 1: a KL-regularised autoencoder (sdjax's AutoencoderKL), as in Latent Diffusion (Rombach et al.).

    sdjax train autoencoder --config shapes_autoencoder --workdir runs/shapes_autoencoder

Loss: L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)) (both per image element, see `losses`),
plus, when disc_start is set, a hinge-loss patch discriminator switched on after disc_start steps.
A fully convolutional autoencoder (no mid-block attention) can train on random crops (crop_size) and run on
whole images.
The downsampling factor f = 2 ** (number of blocks - 1). After training, the latents' scaling factor
(1 / std of the latents over training images, as the paper does) is written into the VAE's config
and the VAE is saved in diffusers format to <workdir>/vae. Killed, the same command resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax.errors import ConfigError
from sdjax.io import write_json
from sdjax.models.autoencoder_kl import AutoencoderKL

from . import data as data_lib
from . import parallel
from .checkpointing import Checkpointer, check_or_write_config, prepare_workdir
from .config import LoopConfig, check_ranges, to_jsonable
from .loop import Step, restore_or_init, run_steps
from .metrics import MetricsLog, plot_losses

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Config(LoopConfig):
    """Stage 1's keys and types; the values (defaults included) come from a config file (configs/)."""

    dataset: str
    image_size: int
    num_train_images: int | None
    num_eval_images: int
    data_seed: int
    vae: dict  # AutoencoderKL config keys; f = 2 ** (len(block_out_channels) - 1)
    weight_decay: float
    kl_weight: float
    disc_start: int | None  # None: no discriminator
    disc_weight: float
    disc_learning_rate: float
    scale_images: int  # training images encoded to measure the latents' std
    crop_size: int | None  # train on random crops of this size (fully convolutional); None: whole images
    posterior_logvar_init: float | None  # the posterior's initial log-variance (quant_conv's bias); None: 0

    def validate(self) -> None:
        super().validate()
        AutoencoderKL.check_config_dict(self.vae, "config key 'vae'",
                                        filled=("down_block_types", "up_block_types", "sample_size", "scaling_factor"))
        check_ranges(self, at_least_one=("image_size", "num_eval_images", "scale_images", "num_train_images",
                                         "crop_size"),
                     non_negative=("weight_decay", "kl_weight", "disc_weight", "disc_start"),
                     positive=("disc_learning_rate",))
        if self.num_train_images is not None and self.num_train_images < self.batch_size:
            raise ConfigError(f"config key 'num_train_images' = {self.num_train_images}: fewer than one batch "
                              f"(batch_size {self.batch_size})")
        if self.crop_size is not None:
            self._check_crop_size(make_vae(self))

    def _check_crop_size(self, vae: AutoencoderKL) -> None:
        f = vae.vae_scale_factor
        if self.crop_size > self.image_size or self.crop_size % f:
            raise ConfigError(f"config key 'crop_size' = {self.crop_size}: must be at most image_size "
                              f"({self.image_size}) and a multiple of the autoencoder's factor {f}")
        if vae.mid_block_add_attention:
            raise ConfigError(f"config key 'crop_size' = {self.crop_size}: crops need a fully convolutional "
                              "autoencoder (vae.mid_block_add_attention = false): attention sees the whole image")


def make_vae(cfg: Config, scaling_factor: float = 1.0) -> AutoencoderKL:
    n = len(cfg.vae["block_out_channels"])
    vae_cfg = dict(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                   sample_size=cfg.image_size, scaling_factor=scaling_factor) | dict(cfg.vae)
    return AutoencoderKL.from_config(vae_cfg)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.), as the paper's autoencoder uses: a logit per overlapping patch."""

    channels: tuple = (32, 64)

    @nn.compact
    def __call__(self, x_nchw):
        x = jnp.transpose(x_nchw, (0, 2, 3, 1))
        for i, c in enumerate(self.channels):
            x = nn.Conv(c, (4, 4), strides=2, padding=1)(x)
            if i:
                x = nn.GroupNorm(num_groups=8)(x)
            x = nn.leaky_relu(x, 0.2)
        return nn.Conv(1, (3, 3), padding=1)(x)


def make_optimizer(lr, warmup, total, weight_decay):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total, warmup + 1), lr * 0.1)
    return optax.adamw(schedule, b2=0.999, weight_decay=weight_decay)


def create_train_state(cfg: Config, vae: AutoencoderKL):
    key = jax.random.PRNGKey(cfg.seed)
    params = vae.init_weights(key)
    if cfg.posterior_logvar_init is not None:  # a near-deterministic posterior from the start: less noise to unlearn
        bias = params["quant_conv"]["bias"]
        params["quant_conv"]["bias"] = bias.at[vae.latent_channels:].set(cfg.posterior_logvar_init)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": make_optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.num_steps, cfg.weight_decay).init(params)}
    if cfg.disc_start is not None:
        disc = PatchDiscriminator()
        dparams = disc.init(jax.random.fold_in(key, 1), jnp.zeros((1, 3, cfg.image_size, cfg.image_size)))["params"]
        state["disc_params"] = dparams
        state["disc_opt_state"] = optax.adam(cfg.disc_learning_rate, b1=0.5).init(dparams)
    return state


def losses(vae, params, images, key):
    """(L1 per image element, KL per image element, reconstructions)."""
    posterior = vae.apply({"params": params}, images, method=vae.encode)
    recon = vae.apply({"params": params}, posterior.sample(key), method=vae.decode)
    l1 = jnp.mean(jnp.abs(recon - images))
    kl = jnp.mean(posterior.kl()) / np.prod(images.shape[1:])
    return l1, kl, recon


def train_step(cfg: Config, vae: AutoencoderKL, state, images, key):
    tx = make_optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.num_steps, cfg.weight_decay)
    use_disc = cfg.disc_start is not None
    disc = PatchDiscriminator() if use_disc else None
    disc_on = (state["step"] >= (cfg.disc_start or 0)).astype(jnp.float32) if use_disc else 0.0

    def loss_fn(params):
        l1, kl, recon = losses(vae, params, images, key)
        loss = l1 + cfg.kl_weight * kl
        g_loss = jnp.zeros(())
        if use_disc:
            g_loss = -jnp.mean(disc.apply({"params": state["disc_params"]}, recon))
            loss = loss + disc_on * cfg.disc_weight * g_loss
        return loss, (l1, kl, g_loss, recon)

    (loss, (l1, kl, g_loss, recon)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates), opt_state=opt_state)
    metrics = {"loss": loss, "l1": l1, "kl": kl}
    if use_disc:
        recon = jax.lax.stop_gradient(recon)

        def d_loss_fn(dp):
            real = disc.apply({"params": dp}, images)
            fake = disc.apply({"params": dp}, recon)
            return 0.5 * (jnp.mean(nn.relu(1.0 - real)) + jnp.mean(nn.relu(1.0 + fake)))

        d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state["disc_params"])
        d_updates, d_opt = optax.adam(cfg.disc_learning_rate, b1=0.5).update(d_grads, state["disc_opt_state"])
        d_updates = jax.tree_util.tree_map(lambda u: u * disc_on, d_updates)
        new["disc_params"] = optax.apply_updates(state["disc_params"], d_updates)
        new["disc_opt_state"] = d_opt
        metrics |= {"g_loss": g_loss, "d_loss": d_loss}
    return new, metrics


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(vae, params, x):
    return vae.apply({"params": params}, x)


@functools.partial(jax.jit, static_argnums=0)
def _posterior_sample(vae, params, x, key):
    return vae.apply({"params": params}, x, method=vae.encode).sample(key)


def psnr(vae, params, images_uint8, batch_size: int = 64) -> float:
    """Mean PSNR (dB, images in [0, 1]) of the posterior-mode reconstructions."""
    vals = []
    for i in range(0, len(images_uint8), batch_size):
        x = data_lib.to_model_input(images_uint8[i:i + batch_size])
        r = np.clip(np.asarray(_reconstruct(vae, params, x)), -1, 1)
        mse = np.mean(((r - x) / 2) ** 2, axis=(1, 2, 3))
        vals.append(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))
    return float(np.mean(np.concatenate(vals)))


def latent_std(vae, params, images_uint8, seed: int, batch_size: int = 128) -> float:
    """Std of posterior samples over all latent elements (the paper's scaling factor is its inverse)."""
    zs = [np.asarray(_posterior_sample(vae, params, data_lib.to_model_input(images_uint8[i:i + batch_size]),
                                       jax.random.fold_in(jax.random.PRNGKey(seed), i)))
          for i in range(0, len(images_uint8), batch_size)]
    return float(np.std(np.concatenate(zs)))


def random_crops(images: np.ndarray, size: int | None, factor: int, seed: int, step: int) -> np.ndarray:
    """[N, H, W, C] -> [N, size, size, C], each image's own window, at multiples of `factor` (the autoencoder's
    downsampling grid, as whole images are seen at inference); a function of (seed, step), so a resumed run sees
    the same crops. size None: the images unchanged."""
    if size is None or size == images.shape[1]:
        return images
    n, h, w = images.shape[:3]
    rng = np.random.default_rng([seed, step])
    oy = rng.integers(0, (h - size) // factor + 1, n) * factor
    ox = rng.integers(0, (w - size) // factor + 1, n) * factor
    rows = oy[:, None] + np.arange(size)
    cols = ox[:, None] + np.arange(size)
    return images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_and_evaluate(cfg: Config, workdir, until_step: int | None = None, progress: bool = True,
                       final_save: bool = True) -> dict:
    """Train (resuming from workdir's last checkpoint), then write vae/ and summary.json.

    until_step: stop there (checkpointed unless final_save=False, which simulates a kill); rerun to go on."""
    workdir = prepare_workdir(workdir, "sdjax train autoencoder")
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    check_or_write_config(workdir, to_jsonable(cfg), resumable=ckpt.latest_step() is not None)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(cfg.batch_size, mesh)
    train_ds, eval_ds = data_lib.train_and_eval(cfg.dataset, cfg.num_train_images, cfg.num_eval_images,
                                                cfg.image_size, cfg.data_seed)
    vae = make_vae(cfg)
    state, start = restore_or_init(ckpt, lambda: create_train_state(cfg, vae), mesh)
    log = MetricsLog(workdir / "metrics.jsonl", start)

    def make_batch(step):
        idx = data_lib.batch_indices(len(train_ds), cfg.batch_size, cfg.data_seed, step)
        images = random_crops(train_ds.images[idx], cfg.crop_size, vae.vae_scale_factor, cfg.data_seed, step)
        return parallel.shard_batch(data_lib.to_model_input(images), mesh)

    step = Step(train_step, mesh, cfg, vae)
    state, summary = run_steps(cfg, state, start, step, make_batch, ckpt, log, desc="autoencoder",
                               until_step=until_step, final_save=final_save, progress=progress)
    if summary["steps"] < cfg.num_steps or not parallel.is_primary():  # process 0 evaluates and writes
        return summary

    params = jax.device_get(state["params"])
    summary["psnr_db"] = psnr(vae, params, eval_ds.images)
    std = latent_std(vae, params, train_ds.images[:cfg.scale_images], cfg.seed)
    summary["latent_std"], summary["scaling_factor"] = std, 1.0 / std
    summary["f"] = vae.vae_scale_factor
    summary["final_l1"] = log.rows()[-1]["l1"] if log.rows() else None
    make_vae(cfg, scaling_factor=1.0 / std).save_pretrained(workdir / "vae", params)
    write_json(workdir / "summary.json", summary)
    plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", keys=("loss", "l1", "kl"),
                title=f"autoencoder f={vae.vae_scale_factor}: PSNR {summary['psnr_db']:.2f} dB")
    logger.info("autoencoder: %s", summary)
    return summary
