"""A noise-conditional classifier on a diffusion model's latents, for classifier guidance.

    sdjax train classifier --config shapes_classifier --workdir runs/shapes_noise_classifier
    sdjax train export --workdir runs/shapes_noise_classifier --out sdjax/assets/toy-shapes-classifier --overwrite

Dhariwal & Nichol's recipe on the toy model's latent space: the shapes images are encoded with the model's own
VAE (posterior mean and std cached in <workdir>/latents.npz; a fresh posterior sample every step, times the
VAE's scaling_factor), noised by the forward process of the model's training schedule (the DDPM `add_noise`
of its scheduler config, t uniform over the training timesteps), and `sdjax.models.NoiseClassifier` learns
color, shape and background from (z_t, t) with the summed cross-entropy of the three heads. Data parallel over
all devices, resumable (Orbax), exported as config.json + safetensors (<workdir>/classifier, or export_dir)
with the held-out accuracy at several t in summary.json.

It is the guiding classifier; `sdjax.train.evaluate` has the evaluation classifier, a different model (pixels,
clean images, its own training data), so that guidance is not scored by the model it followed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax.assets import toy_model_path
from sdjax.errors import ConfigError
from sdjax.io import check_output_dir, read_json, write_folder, write_json
from sdjax.models.autoencoder_kl import AutoencoderKL
from sdjax.models.noise_classifier import NoiseClassifier, label_log_prob, split_logits
from sdjax.schedulers import DDPMScheduler, load_scheduler_config

from . import data as data_lib
from . import parallel
from .checkpointing import Checkpointer, check_or_write_config, prepare_workdir
from .config import LoopConfig, build_config, check_ranges, to_jsonable
from .ldm import cached_latents, encode_dataset
from .loop import Step, restore_or_init, run_steps
from .metrics import MetricsLog, plot_losses

logger = logging.getLogger(__name__)

COMMAND = "sdjax train classifier"
EXPORT_COMMAND = "sdjax train export"
HEADS = ("color", "shape", "background")  # the shapes dataset's labels, in data.ImageDataset.labels' column order
FILLED = ("in_channels", "sample_size", "num_train_timesteps", "heads", "num_labels", "label_names")


@dataclasses.dataclass
class Config(LoopConfig):
    """The classifier stage's keys and types; the values (defaults included) come from a config file (configs/)."""

    model: str | None  # the diffusion model folder whose vae/ and scheduler/ are used; None: the shipped toy model
    dataset: str  # "shapes" (the only dataset with labels)
    image_size: int
    num_train_images: int
    num_eval_images: int  # held-out shapes images for the accuracy at each of eval_timesteps
    data_seed: int
    classifier: dict  # NoiseClassifier config keys (the FILLED ones come from the VAE, the schedule and the data)
    weight_decay: float
    eval_timesteps: list  # training timesteps at which the held-out accuracy is measured
    export_dir: str | None  # default: <workdir>/classifier

    def validate(self) -> None:
        super().validate()
        if self.dataset != "shapes":
            raise ConfigError(f"config key 'dataset' = {self.dataset!r}: the classifier needs labels; only 'shapes' "
                              "has them")
        NoiseClassifier.check_config_dict(self.classifier, "config key 'classifier'", filled=FILLED)
        check_ranges(self, at_least_one=("image_size", "num_train_images", "num_eval_images"),
                     non_negative=("weight_decay",))
        if self.num_train_images < self.batch_size:
            raise ConfigError(f"config key 'num_train_images' = {self.num_train_images}: fewer than one batch "
                              f"(batch_size {self.batch_size})")
        if not self.eval_timesteps or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                              for t in self.eval_timesteps):
            raise ConfigError(f"config key 'eval_timesteps' = {self.eval_timesteps!r}: give training timesteps "
                              "(ints >= 0)")


def model_folder(cfg: Config) -> Path:
    return Path(cfg.model) if cfg.model else toy_model_path()


def load_diffusion_parts(cfg: Config):
    """(vae, vae params, the training schedule as a DDPM scheduler) of the diffusion model the classifier serves."""
    folder = model_folder(cfg)
    if not (folder / "vae" / "config.json").is_file() or not (folder / "scheduler").is_dir():
        raise ConfigError(f"config key 'model' = {cfg.model!r}: {folder} is not a pipeline folder with vae/ and "
                          "scheduler/")
    vae, vae_params = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    schedule = load_scheduler_config(folder, subfolder="scheduler")
    noise_sched = DDPMScheduler.from_config(schedule)
    too_late = [t for t in cfg.eval_timesteps if t >= noise_sched.num_train_timesteps]
    if too_late:
        raise ConfigError(f"config key 'eval_timesteps': {too_late} not below the model's "
                          f"{noise_sched.num_train_timesteps} training timesteps")
    return vae, vae_params, noise_sched


def make_classifier(cfg: Config, vae: AutoencoderKL, noise_sched) -> NoiseClassifier:
    f = vae.vae_scale_factor
    if cfg.image_size % f:
        raise ConfigError(f"image_size {cfg.image_size} is not a multiple of the autoencoder's factor {f}")
    names = (*data_lib.COLOR_NAMES, *data_lib.SHAPES, *data_lib.BACKGROUND_NAMES)
    return NoiseClassifier.from_config(dict(cfg.classifier) | dict(
        in_channels=vae.latent_channels, sample_size=cfg.image_size // f,
        num_train_timesteps=noise_sched.num_train_timesteps, heads=list(HEADS),
        num_labels=[len(data_lib.COLORS), len(data_lib.SHAPES), len(data_lib.BACKGROUNDS)], label_names=list(names)))


def make_optimizer(cfg: Config):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                                  max(cfg.num_steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def create_train_state(cfg: Config, classifier: NoiseClassifier):
    params = classifier.init_weights(jax.random.PRNGKey(cfg.seed))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": make_optimizer(cfg).init(params)}


def head_accuracies(classifier: NoiseClassifier, logits, labels) -> dict:
    return {f"acc_{h}": jnp.mean(jnp.argmax(lg, -1) == labels[:, k])
            for k, (h, lg) in enumerate(zip(classifier.heads, split_logits(logits, classifier.num_labels)))}


def train_step(cfg: Config, classifier, noise_sched, scaling_factor, state, batch, key):
    """One step: sample z from the cached posterior, noise it to a uniform t, cross-entropy of every head; AdamW."""
    mean, std, labels = batch["latent_mean"], batch["latent_std"], batch["labels"]
    b = mean.shape[0]
    k_z, k_noise, k_t = jax.random.split(key, 3)
    z = (mean + std * jax.random.normal(k_z, mean.shape)) * scaling_factor
    t = jax.random.randint(k_t, (b,), 0, noise_sched.num_train_timesteps)
    noisy = noise_sched.add_noise(z, jax.random.normal(k_noise, z.shape), t)

    def loss_fn(params):
        logits = classifier.apply({"params": params}, noisy, t)
        return -jnp.mean(label_log_prob(logits, labels, classifier.num_labels)), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = make_optimizer(cfg).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **head_accuracies(classifier, logits, labels)}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def _noisy_logits(classifier, noise_sched, params, z, noise, t):
    return classifier.apply({"params": params}, noise_sched.add_noise(z, noise, t), t)


def held_out_accuracy(classifier, noise_sched, params, latents_mean, labels, timesteps, seed: int,
                      batch_size: int = 256) -> dict:
    """{t: {head: accuracy}} on held-out latents (posterior means) noised at each t with fixed noise."""
    out = {}
    for t in timesteps:
        correct = np.zeros(len(classifier.heads))
        for i in range(0, len(latents_mean), batch_size):
            z = jnp.asarray(latents_mean[i:i + batch_size])
            noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), z.shape)
            logits = _noisy_logits(classifier, noise_sched, params, z, noise, jnp.full((z.shape[0],), t, jnp.int32))
            for k, lg in enumerate(split_logits(logits, classifier.num_labels)):
                correct[k] += float(np.sum(np.asarray(jnp.argmax(lg, -1)) == labels[i:i + batch_size, k]))
        out[str(t)] = {h: correct[k] / len(latents_mean) for k, h in enumerate(classifier.heads)}
    return out


def train_and_evaluate(cfg: Config, workdir, until_step: int | None = None, progress: bool = True,
                       final_save: bool = True, export: bool = True) -> dict:
    started = time.time()
    workdir = prepare_workdir(workdir, COMMAND)
    if export and cfg.export_dir:  # checked now, not after the training
        check_output_dir(cfg.export_dir, EXPORT_COMMAND, protect=(workdir,))
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    check_or_write_config(workdir, to_jsonable(cfg), ckpt.latest_step() is not None)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(cfg.batch_size, mesh)

    vae, vae_params, noise_sched = load_diffusion_parts(cfg)
    classifier = make_classifier(cfg, vae, noise_sched)
    train, held = data_lib.train_and_eval(cfg.dataset, cfg.num_train_images, cfg.num_eval_images, cfg.image_size,
                                          cfg.data_seed)
    lat_mean, lat_std = cached_latents(workdir, vae, vae_params, train)
    labels = np.asarray(train.labels, np.int32)

    state, start = restore_or_init(ckpt, lambda: create_train_state(cfg, classifier), mesh)
    log = MetricsLog(workdir / "metrics.jsonl", start)

    def make_batch(step):
        idx = data_lib.batch_indices(len(train), cfg.batch_size, cfg.data_seed, step)
        return parallel.shard_batch({"latent_mean": lat_mean[idx], "latent_std": lat_std[idx],
                                     "labels": labels[idx]}, mesh)

    step = Step(train_step, mesh, cfg, classifier, noise_sched, float(vae.scaling_factor))
    state, summary = run_steps(cfg, state, start, step, make_batch, ckpt, log, desc="classifier",
                               until_step=until_step, final_save=final_save, progress=progress)
    if summary["steps"] < cfg.num_steps:
        return summary
    params = jax.device_get(state["params"])
    held_mean, _ = encode_dataset(vae, vae_params, held.images)
    summary["held_out_accuracy"] = held_out_accuracy(classifier, noise_sched, params,
                                                     held_mean * float(vae.scaling_factor), held.labels,
                                                     cfg.eval_timesteps, cfg.seed)
    summary["wall_seconds_this_run"] = time.time() - started
    summary["parameters"] = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", keys=("loss", "acc_color", "acc_shape"),
                title="noise-conditional classifier (train batches, t uniform)")
    if export:
        out = Path(cfg.export_dir) if cfg.export_dir else workdir / "classifier"
        export_classifier(out, classifier, params, training=export_summary(cfg, summary, noise_sched),
                          overwrite=not cfg.export_dir, protect=(workdir,))
        summary["classifier"] = str(out)
    write_json(workdir / "summary.json", summary)
    logger.info("classifier: %s", summary)
    return summary


def export_summary(cfg: Config, summary: dict, noise_sched) -> dict:
    """What the exported folder says about how it was trained (summary.json beside config.json)."""
    return {"trained_by": COMMAND, "model": str(cfg.model or "the shipped toy model (sdjax/assets/toy-shapes)"),
            "noise_schedule": {k: noise_sched.config[k] for k in ("num_train_timesteps", "beta_schedule",
                                                                  "beta_start", "beta_end")},
            "steps": summary["steps"], "batch_size": cfg.batch_size, "train_images": cfg.num_train_images,
            "data_seed": cfg.data_seed, "held_out_accuracy": summary.get("held_out_accuracy"),
            "held_out_images": cfg.num_eval_images}


def export_classifier(out_dir, classifier: NoiseClassifier, params, training: dict | None = None,
                      overwrite: bool = False, protect=()) -> Path:
    """config.json + diffusion_pytorch_model.safetensors (+ summary.json), written beside `out_dir` and swapped in
    whole. An existing `out_dir` is replaced only if an earlier export wrote it, or with `overwrite`."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, EXPORT_COMMAND, overwrite=overwrite, protect=protect)

    def fill(tmp):
        classifier.save_pretrained(tmp, params)
        if training is not None:
            write_json(tmp / "summary.json", training)

    return write_folder(out_dir, EXPORT_COMMAND, fill)


def export_from_workdir(workdir, out_dir, overwrite: bool = False) -> Path:
    """The classifier of a classifier workdir's latest checkpoint, exported to `out_dir`."""
    workdir = Path(workdir)
    check_output_dir(out_dir, EXPORT_COMMAND, overwrite=overwrite, protect=(workdir,))  # before any work
    cfg = build_config(Config, read_json(workdir / "config.json"), source=str(workdir / "config.json"))
    vae, _, noise_sched = load_diffusion_parts(cfg)
    classifier = make_classifier(cfg, vae, noise_sched)
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    if ckpt.latest_step() is None:
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints: nothing to export yet")
    state = ckpt.restore(jax.eval_shape(lambda: create_train_state(cfg, classifier)))
    ckpt.close()
    summary_path = workdir / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else {"steps": int(state["step"])}
    summary["steps"] = int(state["step"])
    return export_classifier(out_dir, classifier, jax.device_get(state["params"]),
                             training=export_summary(cfg, summary, noise_sched), overwrite=overwrite,
                             protect=(workdir,))
