"""LoRA fine-tuning of a trained pipeline: teach the shipped toy model a new colour word ("orange") or shape ("star").

    sdjax train lora --config shapes_lora --workdir runs/shapes_lora

The base model's weights stay frozen; only the LoRA factors (PEFT's A and B: `down` and `up` here) are trained,
merged into the weights inside the compiled step exactly as the pipeline merges them at sampling time
(`sdjax.lora.merge_lora`: W + alpha/rank * up @ down). Batches mix concept images ("an orange circle on a white
background", train.data.concept_dataset) with the base model's own training images, so the old prompts keep their
adherence. With `token_init` (pivotal tuning) the concept word is first added to the tokenizer as one new token, as
textual inversion does, its embedding row initialised from those words' and trained with the factors. Captions are
dropped with probability caption_dropout, so classifier-free guidance still works. B starts at zero (the adapter
starts as a no-op) and A at PEFT's kaiming-uniform scale.

At the end the adapter is written in diffusers/PEFT format (<workdir>/lora/pytorch_lora_weights.safetensors, with
its LoraConfig as metadata): diffusers' `load_lora_weights` and sdjax's `pipe.load_lora_weights` / `--lora` load it;
the new token's row beside it as learned_embeds.safetensors (`load_textual_inversion` / `--embedding`).
Evaluation (train/evaluate.py's classifier, extended with the concept's class): the share of concept-prompt images
classified as the concept, and the old prompts' adherence with and without the adapter; sample grids as PNG.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax import convert
from sdjax.errors import ConfigError
from sdjax.io import write_json, write_safetensors
from sdjax.lora import LoraAdapter, LoraLayer, merge_lora, save_lora
from sdjax.pipelines import FlaxStableDiffusionPipeline
from sdjax.schedulers import DDPMScheduler
from sdjax.textual_inversion import TEXT_INVERSION_NAME_SAFE, embedding_table, with_embedding_table

from . import data as data_lib
from . import evaluate as eval_lib
from . import parallel
from . import tokenizer as tokenizer_lib
from .checkpointing import Checkpointer, check_or_write_config, prepare_workdir
from .config import LoopConfig, check_choice, check_ranges, to_jsonable
from .ldm import encode_dataset, noised_batch
from .loop import Step, ema_update, restore_or_init, run_steps
from .metrics import MetricsLog, plot_losses

logger = logging.getLogger(__name__)

COMPONENT_TARGETS = (("unet", "unet_targets"), ("text_encoder", "text_encoder_targets"))


@dataclasses.dataclass
class Config(LoopConfig):
    """The LoRA stage's keys and types; the values (defaults included) come from a config file (configs/)."""

    base_model: str | None
    concept: str
    num_concept_images: int
    num_prior_images: int
    prior_fraction: float
    data_seed: int
    unet_targets: list
    text_encoder_targets: list
    rank: int
    alpha: float
    caption_dropout: float
    ema_decay: float
    token_init: list
    eval_per_caption: int
    eval_guidance: float
    eval_steps: int

    def validate(self) -> None:
        super().validate()
        check_ranges(self, at_least_one=("num_concept_images", "rank", "eval_per_caption", "eval_steps"),
                     non_negative=("num_prior_images",), positive=("alpha",),
                     unit_interval=("caption_dropout", "ema_decay"))
        check_choice(self, "concept", data_lib.CONCEPTS)
        if not 0 <= self.prior_fraction < 1:
            raise ConfigError(f"config key 'prior_fraction' must be in [0, 1), got {self.prior_fraction}")
        if self.prior_fraction > 0 and self.num_prior_images == 0:
            raise ConfigError("config key 'prior_fraction' > 0 needs num_prior_images >= 1")
        if not self.unet_targets and not self.text_encoder_targets:
            raise ConfigError("config keys 'unet_targets' and 'text_encoder_targets' are both empty: nothing to train")
        if not all(isinstance(w, str) and w for w in self.token_init):
            raise ConfigError(f"config key 'token_init' must be a list of words, got {self.token_init!r}")


# ---------------------------------------------------------------------------------------------- the adapter
def target_layers(params, targets) -> list[tuple[str, ...]]:
    """Module paths of the layers (those with a `kernel`) whose name is one of `targets`."""
    return sorted(p[:-1] for p in convert.flat_params(params) if p[-1] == "kernel" and p[-2] in set(targets))


def init_lora(cfg: Config, params, key) -> dict:
    """{component: {"a/b/c": {"down": [.., in, r], "up": [r, out]}}}: up zero (a no-op adapter), down as PEFT's
    kaiming-uniform(a=sqrt(5)) init of lora_A, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    out = {}
    for c, (component, key_name) in enumerate(COMPONENT_TARGETS):
        targets = getattr(cfg, key_name)
        if not targets:
            continue
        paths = target_layers(params[component], targets)
        names = {p[-1] for p in paths}
        missing = [t for t in targets if t not in names]
        if missing:
            raise ConfigError(f"config key {key_name!r}: no {component} layer is named {missing} (layer names: "
                              f"{', '.join(sorted({p[-2] for p in convert.flat_params(params[component]) if p[-1] == 'kernel'}))})")
        flat = convert.flat_params(params[component])
        layers = {}
        for i, path in enumerate(paths):
            kernel = flat[path + ("kernel",)]
            fan_in = int(np.prod(kernel.shape[:-1]))
            bound = 1.0 / np.sqrt(fan_in)
            k = jax.random.fold_in(jax.random.fold_in(key, c), i)
            down = jax.random.uniform(k, tuple(kernel.shape[:-1]) + (cfg.rank,), jnp.float32, -bound, bound)
            layers["/".join(path)] = {"down": down, "up": jnp.zeros((cfg.rank, kernel.shape[-1]), jnp.float32)}
        out[component] = layers
    return out


def to_adapter(cfg: Config, lora: dict) -> LoraAdapter:
    alpha = jnp.asarray(cfg.alpha, jnp.float32)
    return LoraAdapter(layers={c: {k: LoraLayer(down=v["down"], up=v["up"], alpha=alpha) for k, v in layers.items()}
                               for c, layers in lora.items()})


# ---------------------------------------------------------------------------------------------- the new token
def add_concept_token(cfg: Config, pipe, params):
    """Pivotal tuning: the concept word becomes one new token (textual inversion's `load_textual_inversion`, so
    the tokenizer and text encoder are what a user gets from the exported learned_embeds.safetensors), its
    embedding the mean of the `token_init` words' (each one token of the base tokenizer). (pipe, params, id)."""
    _, table = embedding_table(params["text_encoder"])
    rows = []
    for word in cfg.token_init:
        ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError(f"config key 'token_init': {word!r} is {len(ids)} tokens of the base model's tokenizer "
                              f"({pipe.tokenizer.convert_ids_to_tokens(ids)}); each word must be one token")
        rows.append(np.asarray(table[ids[0]]))
    vector = np.mean(rows, axis=0, keepdims=True).astype(np.float32)
    pipe, params = pipe.load_textual_inversion({cfg.concept: vector}, params, token=cfg.concept)
    (token_id,) = pipe.tokenizer(cfg.concept, add_special_tokens=False).input_ids
    return pipe, params, token_id


def with_token(text_encoder_params, token_id, vector):
    """The text encoder's params with row `token_id` of the embedding table set to `vector`."""
    _, table = embedding_table(text_encoder_params)
    return with_embedding_table(text_encoder_params, table.at[token_id].set(vector.astype(table.dtype)))


def make_optimizer(cfg: Config):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                                  max(cfg.num_steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def create_train_state(cfg: Config, params, token_id: int | None = None) -> dict:
    """Adam and EMA over the trainable tree, state["lora"]: {"lora": the factors} (+ "token": the new word's
    embedding row)."""
    trainable = {"lora": init_lora(cfg, params, jax.random.PRNGKey(cfg.seed))}
    if token_id is not None:
        trainable["token"] = embedding_table(params["text_encoder"])[1][token_id]
    return {"step": jnp.zeros((), jnp.int32), "lora": trainable, "opt_state": make_optimizer(cfg).init(trainable),
            "ema": jax.tree_util.tree_map(jnp.copy, trainable)}  # own buffers: the state is donated


def train_step(cfg: Config, text_encoder, unet, noise_sched, scaling_factor, empty_ids, token_id, state, batch,
               key):
    """One step: z from the cached posterior, captions dropped, noise, predict with the LoRA merged, MSE; Adam; EMA.
    batch["base"] holds the frozen base params (replicated; an argument of the program, not a constant in it)."""
    base = batch["base"]
    drop, t, noisy, target = noised_batch(key, batch, scaling_factor, noise_sched, noise_sched.config.num_train_timesteps,
                                          noise_sched.config.prediction_type, cfg.caption_dropout)
    ids = jnp.where(drop[:, None], empty_ids[None, :], batch["input_ids"])

    def loss_fn(trainable):
        params = merge_lora(base, {"lora": to_adapter(cfg, trainable["lora"])})
        if "token" in trainable:
            params = {**params, "text_encoder": with_token(params["text_encoder"], token_id, trainable["token"])}
        context = text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
        pred = unet.apply({"params": params["unet"]}, noisy, t, context)
        return jnp.mean((pred - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["lora"])
    updates, opt_state = make_optimizer(cfg).update(grads, state["opt_state"], state["lora"])
    trainable = optax.apply_updates(state["lora"], updates)
    step = state["step"] + 1
    ema = ema_update(state["ema"], trainable, step, cfg.ema_decay)
    return ({"step": step, "lora": trainable, "opt_state": opt_state, "ema": ema},
            {"loss": loss, "grad_norm": optax.tree.norm(grads)})


# ---------------------------------------------------------------------------------------------- data
def training_data(cfg: Config, image_size: int):
    """(concept dataset, prior dataset or None)."""
    concept = data_lib.concept_dataset(cfg.concept, cfg.num_concept_images, seed=cfg.data_seed, image_size=image_size)
    prior = (data_lib.shapes_dataset(cfg.num_prior_images, seed=cfg.data_seed, image_size=image_size)
             if cfg.num_prior_images and cfg.prior_fraction > 0 else None)
    return concept, prior


def batch_rows(cfg: Config, n_concept: int, n_prior: int, step: int) -> np.ndarray:
    """Row indices into concat(concept, prior) for `step`: a fixed share from each, derived from (seed, step)."""
    k = int(round(cfg.batch_size * cfg.prior_fraction)) if n_prior else 0
    rows = data_lib.batch_indices(n_concept, cfg.batch_size - k, cfg.data_seed, step)
    if k:
        rows = np.concatenate([rows, n_concept + data_lib.batch_indices(n_prior, k, cfg.data_seed + 1, step)])
    return rows


# ---------------------------------------------------------------------------------------------- the stage
def load_base(cfg: Config):
    from sdjax.assets import toy_model_path

    model = cfg.base_model or toy_model_path()
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(model)
    return str(model), pipe, params


def train_and_evaluate(cfg: Config, workdir, until_step: int | None = None, progress: bool = True,
                       final_save: bool = True, evaluate: bool = True, classifier_dir="runs/shapes_classifier") -> dict:
    # the base model and the new token first: a bad base_model or token_init word writes nothing in the workdir
    model, pipe, params = load_base(cfg)
    base_pipe, base_params, token_id = pipe, params, None
    if cfg.token_init:  # the concept word as a new token, trained with the LoRA (pivotal tuning)
        pipe, params, token_id = add_concept_token(cfg, pipe, params)
    workdir = prepare_workdir(workdir, "sdjax train lora")
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    resumable = ckpt.latest_step() is not None
    check_or_write_config(workdir, to_jsonable(cfg), resumable)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(cfg.batch_size, mesh)

    base = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    size = pipe.default_size
    concept, prior = training_data(cfg, size)
    images = concept.images if prior is None else np.concatenate([concept.images, prior.images])
    captions = concept.captions + ([] if prior is None else prior.captions)
    t0 = time.time()
    lat_mean, lat_std = encode_dataset(pipe.vae, params["vae"], images)
    logger.info("encoded %d images in %.1f s", len(images), time.time() - t0)
    input_ids = tokenizer_lib.encode(pipe.tokenizer, captions)
    empty_ids = jnp.asarray(tokenizer_lib.encode(pipe.tokenizer, [""])[0])
    noise_sched = DDPMScheduler.from_config(_training_schedule(pipe))
    n_prior = 0 if prior is None else len(prior)

    state, start = restore_or_init(ckpt, lambda: create_train_state(cfg, base, token_id), mesh)
    log = MetricsLog(workdir / "metrics.jsonl", start)

    def make_batch(step):
        idx = batch_rows(cfg, len(concept), n_prior, step)
        return {**parallel.shard_batch({"latent_mean": lat_mean[idx], "latent_std": lat_std[idx],
                                        "input_ids": input_ids[idx]}, mesh), "base": base_on_mesh}

    base_on_mesh = parallel.replicate(base, mesh)
    step = Step(train_step, mesh, cfg, pipe.text_encoder, pipe.unet, noise_sched, float(pipe.vae.scaling_factor),
                empty_ids, token_id)
    state, summary = run_steps(cfg, state, start, step, make_batch, ckpt, log, desc="lora", until_step=until_step,
                               final_save=final_save, progress=progress)
    if summary["steps"] < cfg.num_steps:
        return summary
    rows = log.rows()
    tail = [r["loss"] for r in rows[-5:]]
    summary["final_loss_mean_last_5_logs"] = float(np.mean(tail)) if tail else None
    plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", keys=("loss", "grad_norm"), title="LoRA")
    ema = jax.device_get(state["ema"])  # the EMA of the trained values, as the other stages export
    adapter = to_adapter(cfg, ema["lora"])
    summary["lora"] = str(save_lora(workdir / "lora", adapter))
    summary["adapter"] = adapter.summary()
    summary["base_model"] = model
    if token_id is not None:  # diffusers' textual-inversion format beside the LoRA: {token: [1, D]}
        summary["embedding"] = str(save_embedding(workdir / "lora", cfg.concept, ema["token"]))
        params = {**params, "text_encoder": with_token(params["text_encoder"], token_id, jnp.asarray(ema["token"]))}
    if evaluate:
        summary["evaluation"] = evaluate_lora(pipe, params, adapter, cfg, classifier_dir, workdir,
                                              base=(base_pipe, base_params))
    write_json(workdir / "summary.json", summary)
    logger.info("lora: %s", summary)
    return summary


def save_embedding(folder, token: str, vector) -> Path:
    """learned_embeds.safetensors ({token: [1, D]}), what diffusers' `load_textual_inversion(folder, token=...)`
    and sdjax's read."""
    path = Path(folder) / TEXT_INVERSION_NAME_SAFE
    write_safetensors(path, {token: np.asarray(vector, np.float32)[None]})
    return path


def _by_background(predicted, labels, concept_index: int) -> dict:
    """{background name: share of `predicted` equal to the concept} over the rows of each background."""
    predicted, backgrounds = np.asarray(predicted), np.asarray(labels)[:, 2]
    return {name: float(np.mean(predicted[backgrounds == b] == concept_index))
            for b, name in enumerate(data_lib.BACKGROUND_NAMES) if np.any(backgrounds == b)}


def _training_schedule(pipe) -> dict:
    """The DDPM training noise schedule of the base model's scheduler config (betas, timesteps, prediction)."""
    c = pipe.scheduler.config
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return {k: getattr(c, k) for k in keys if hasattr(c, k)}


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_lora(pipe, params, adapter: LoraAdapter, cfg: Config, classifier_dir, out_dir, base=None) -> dict:
    """Concept prompts with the adapter ("an orange {shape} on a {background} background" for every old shape and
    background, or "a {color} star ..." for every old colour): the share classified as the concept
    (`concept_produced`) and the other heads' adherence; old prompts with and without it: colour/shape/background
    adherence (the shipped evaluation's classifier). base: (pipe, params) without the new token, for the old
    prompts without the adapter (default: pipe, params)."""
    size = pipe.default_size
    clf_new = eval_lib.load_or_train_classifier(classifier_dir, size, extra=(cfg.concept,))
    clf_old = eval_lib.load_or_train_classifier(classifier_dir, size)
    with_lora = {**params, "lora": {"lora": adapter}}  # what pipe.load_lora_weights(saved file, params) gives
    kw = dict(seed=0, guidance=cfg.eval_guidance, steps=cfg.eval_steps)

    backgrounds = range(len(data_lib.BACKGROUNDS))
    if cfg.concept in data_lib.ALL_SHAPES:
        head, i = "shape", data_lib.ALL_SHAPES.index(cfg.concept)
        combos = [(c, i, b) for c in range(len(data_lib.COLORS)) for b in backgrounds]
    else:
        head, i = "color", data_lib.ALL_COLOR_NAMES.index(cfg.concept)
        combos = [(i, s, b) for s in range(len(data_lib.SHAPES)) for b in backgrounds]
    combos = combos * cfg.eval_per_caption
    t0 = time.time()
    gen = eval_lib.generate(pipe, with_lora, [data_lib.caption_for(*c) for c in combos], **kw)
    _, preds = eval_lib.predict(clf_new, gen)
    adherence = eval_lib.accuracies(preds, np.array(combos))
    result = {"concept": cfg.concept, "concept_images": len(gen), "concept_produced": adherence[head],
              "concept_adherence": adherence,
              "concept_produced_by_background": _by_background(preds[head], np.array(combos), i)}
    # How the frozen autoencoder carries the concept: real concept images, encoded and decoded, read the same way
    # (averaged over backgrounds, as the prompts are). Not a hard ceiling: sampled latents need not be encodings.
    real = data_lib.concept_dataset(cfg.concept, 360, seed=cfg.data_seed + 1, image_size=size)
    _, rec = eval_lib.predict(clf_new, eval_lib.vae_reconstructions(pipe.vae, params["vae"], real.images))
    result["vae_reconstructions_by_background"] = _by_background(rec[head], real.labels, i)
    result["vae_reconstructions"] = float(np.mean(list(result["vae_reconstructions_by_background"].values())))
    eval_lib.save_grid(gen[:18 * 2], Path(out_dir) / f"samples_{cfg.concept}.png", cols=18)

    old = [combo for combo, _ in data_lib.all_shape_captions()] * cfg.eval_per_caption
    old_captions = [data_lib.caption_for(*c) for c in old]
    base_pipe, base_params = base or (pipe, params)
    for name, pp, p in (("old_prompts_with_lora", pipe, with_lora), ("old_prompts_base", base_pipe, base_params)):
        images = eval_lib.generate(pp, p, old_captions, **kw)
        result[name] = eval_lib.accuracies(eval_lib.predict(clf_old, images)[1], np.array(old))
        eval_lib.save_grid(images[:54], Path(out_dir) / f"samples_{name}.png", cols=18)
    result["old_prompts_change_points"] = {k: 100 * (result["old_prompts_with_lora"][k] - result["old_prompts_base"][k])
                                           for k in result["old_prompts_base"]}
    result["seconds"] = time.time() - t0
    result |= {"guidance": cfg.eval_guidance, "steps": cfg.eval_steps, "per_caption": cfg.eval_per_caption}
    return result
