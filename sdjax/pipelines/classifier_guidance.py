"""Classifier guidance (Dhariwal & Nichol 2021) inside the one denoising scan, alone or with text and CFG.

    from sdjax import FlaxStableDiffusionClassifierGuidedPipeline
    pipe, params = FlaxStableDiffusionClassifierGuidedPipeline.from_pretrained(
        "sdjax/assets/toy-shapes", classifier="sdjax/assets/toy-shapes-classifier")
    # or, over a loaded pipeline: pipe = FlaxStableDiffusionClassifierGuidedPipeline.from_pipe(sd_pipe,
    #     classifier=classifier); params = {**sd_params, "classifier": classifier_params}
    out = pipe(pipe.prepare_inputs([""] * 4), params, jax.random.PRNGKey(0), num_inference_steps=25,
               labels={"color": "red", "shape": "square"}, classifier_scale=4.0)
    out.images, out.trajectory.pred_original_samples   # as text-to-image

At every model call the pipeline's model_fn runs the text-guided one (UNet on [uncond; cond], classifier-free
guidance) and then, on the sampler's sample, the noise-conditional classifier: x_t is the sample in alpha space
(sigma-space samplers: x / sqrt(1 + sigma^2)), g = grad_x sum_heads log p(y_head | x_t, t) for the chosen labels
(`jax.grad` of the classifier, inside the scan), and the prediction becomes eps - s sqrt(1 - alpha_bar_t) g
(`sdjax.guidance.classifier_guidance`, for epsilon, v and sample prediction alike). The engine's loop,
trajectory and x̂0 are unchanged.

Labels ([B, n_heads] int, NO_LABEL = -1 for a head not used) and the classifier scale ([B]) are traced inputs:
changing them never recompiles, and a scale of 0 gives the unguided result bit for bit. Classifier guidance
alone is an empty prompt (the two CFG halves are then the same, whatever guidance_scale is).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..errors import ConfigError, InputError
from ..guidance import classifier_guidance
from ..models.noise_classifier import NO_LABEL, NoiseClassifier, label_log_prob
from .base import runtime_for
from .stable_diffusion import FlaxStableDiffusionPipeline

#: the classifier scale when none is given: the best color adherence from an empty prompt on the toy model (90.7% at
#: 6, 88.9% at 4, 89.8% at 8; docs/guidance.md)
DEFAULT_CLASSIFIER_SCALE = 6.0


class FlaxStableDiffusionClassifierGuidedPipeline(FlaxStableDiffusionPipeline):
    """A Stable Diffusion pipeline whose prediction also follows a noise-conditional classifier's gradient.

    params: the text-to-image pipeline's dict plus params["classifier"] (the NoiseClassifier's params)."""

    components = FlaxStableDiffusionPipeline.components + ("classifier",)

    def __init__(self, text_encoder, vae, unet, tokenizer, scheduler, classifier: NoiseClassifier = None,
                 dtype=jnp.float32, scheduler_base_config: dict | None = None):
        super().__init__(text_encoder, vae, unet, tokenizer, scheduler, dtype=dtype,
                         scheduler_base_config=scheduler_base_config)
        if not isinstance(classifier, NoiseClassifier):
            raise InputError(f"{type(self).__name__} needs classifier=NoiseClassifier (e.g. "
                             f"NoiseClassifier.from_pretrained(path)), got {type(classifier).__name__}")
        if classifier.in_channels != unet.out_channels:
            raise ConfigError(f"the classifier takes {classifier.in_channels}-channel latents, the UNet makes "
                              f"{unet.out_channels}: it was trained for another model")
        if classifier.num_train_timesteps != self.scheduler.num_train_timesteps:
            raise ConfigError(f"the classifier was trained on {classifier.num_train_timesteps} timesteps, the "
                              f"scheduler has {self.scheduler.num_train_timesteps}: it was trained for another "
                              "noise schedule")
        self.classifier = classifier

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, classifier=None, dtype=jnp.float32, scheduler=None,
                        param_dtype=None, allow_pickle: bool = False, revision: str | None = None,
                        abstract: bool = False, vae_encoder: bool = True, **runtime):
        """(pipeline, params) of a Stable Diffusion folder and a classifier folder (NoiseClassifier's config.json +
        safetensors; default: the pipeline folder's classifier/ subfolder). The classifier runs in float32."""
        pipe, params = FlaxStableDiffusionPipeline.from_pretrained(
            pretrained_model_name_or_path, dtype=dtype, scheduler=scheduler, param_dtype=param_dtype,
            allow_pickle=allow_pickle, revision=revision, abstract=abstract, vae_encoder=vae_encoder, **runtime)
        if classifier is None:
            classifier = Path(pretrained_model_name_or_path) / "classifier"
            if not (classifier / "config.json").is_file():
                raise InputError(f"classifier= is required: {pretrained_model_name_or_path} has no classifier/ "
                                 "subfolder (give a NoiseClassifier folder, e.g. sdjax/assets/toy-shapes-classifier)")
        model, clf_params = NoiseClassifier.from_pretrained(classifier, allow_pickle=allow_pickle, abstract=abstract,
                                                            **runtime_for(NoiseClassifier, runtime))
        return cls.from_pipe(pipe, classifier=model), {**params, "classifier": clf_params}

    @classmethod
    def from_pipe(cls, pipe: FlaxStableDiffusionPipeline, **changes):
        """Over another pipeline's modules; classifier= is required unless `pipe` has one."""
        changes.setdefault("classifier", getattr(pipe, "classifier", None))
        return super().from_pipe(pipe, **changes)

    def save_pretrained(self, save_directory, params) -> None:
        """The Stable Diffusion folder (diffusers loads it as before) plus the classifier in classifier/."""
        super().save_pretrained(save_directory, params)
        self.classifier.save_pretrained(Path(save_directory) / "classifier", params["classifier"])

    # ------------------------------------------------------------------ labels
    def prepare_labels(self, labels, batch: int | None = None) -> np.ndarray:
        """{head: label name} (for all `batch` samples) or a list of them -> int32 [B, n_heads] (-1: head unused)."""
        return self.classifier.label_indices(labels, batch)

    def check_labels(self, labels, batch_shape: tuple):
        """labels as the compiled program takes them: int32 batch_shape + [n_heads], every index in [-1, n_labels)."""
        heads = len(self.classifier.heads)
        if labels is None:
            raise InputError("`labels` is required: {head: label} (e.g. {'color': 'red'}), a list of them (one per "
                             f"prompt), or int indices [batch, {heads}] (-1: head unused)")
        n = int(np.prod(batch_shape))
        if isinstance(labels, dict):
            arr = self.prepare_labels(labels)
        elif isinstance(labels, (list, tuple)) and labels and all(isinstance(r, dict) for r in labels):
            if len(labels) != n:
                raise InputError(f"`labels` has {len(labels)} dicts for a batch of {n}")
            arr = self.prepare_labels(list(labels)).reshape(tuple(batch_shape) + (heads,))
        else:
            arr = np.asarray(labels)
            if arr.dtype.kind not in "iu" or arr.shape not in ((heads,), tuple(batch_shape) + (heads,)):
                raise InputError(f"`labels` must be int label indices {tuple(batch_shape) + (heads,)} (one per head "
                                 f"{', '.join(self.classifier.heads)}; -1: unused), or {{head: label}} dicts; got "
                                 f"{arr.dtype} of shape {tuple(arr.shape)}")
            for k, (head, count) in enumerate(zip(self.classifier.heads, self.classifier.num_labels)):
                column = arr[..., k]
                if column.size and (column.min() < NO_LABEL or column.max() >= count):
                    bad = int(column.max() if column.max() >= count else column.min())
                    raise InputError(f"`labels` holds {bad} for head {head!r}, outside [-1, {count})")
        return jnp.asarray(np.broadcast_to(arr, tuple(batch_shape) + (heads,)), jnp.int32)

    # ------------------------------------------------------------------ the computation (traced)
    def classifier_log_prob(self, classifier_params, x, timesteps, labels):
        """log p(y | x_t, t) summed over the heads used: [B]. x: alpha-space latents [B, C, h, w]."""
        logits = self.classifier.apply({"params": classifier_params}, x, timesteps)
        return label_log_prob(logits, labels, self.classifier.num_labels)

    def classifier_gradient(self, classifier_params, x, timesteps, labels):
        """grad_x log p(y | x_t, t) [B, C, h, w] (each sample's own: the classifier has no batch coupling)."""
        total = lambda x: jnp.sum(self.classifier_log_prob(classifier_params, x, timesteps, labels))
        return jax.grad(total)(x.astype(jnp.float32))

    def alpha_space(self, state, sample, i):
        """(x_t in alpha space, alpha_bar_t) of the sampler's sample at call i (sigma space: x / sqrt(1 + sigma^2))."""
        level = self.scheduler.sigma_or_noise_level(state, i).astype(jnp.float32)
        if self.scheduler.sigma_space:
            alpha_bar = 1.0 / (1.0 + level * level)
            return sample * jnp.sqrt(alpha_bar), alpha_bar
        return sample, 1.0 - level * level

    def guidance_inputs(self, inputs: dict) -> dict:
        return {"classifier_labels": inputs["classifier_labels"], "classifier_scale": inputs["classifier_scale"]}

    def guided_model(self, params, context, guidance_scale, output_attentions: bool = False, extra_channels=None,
                     unet_inputs=None, guidance_rescale=None, classifier_labels=None, classifier_scale=None):
        """The text-guided model_fn, then the classifier's gradient at the sample added to its prediction."""
        text_guided = super().guided_model(params, context, guidance_scale, output_attentions,
                                           extra_channels=extra_channels, unet_inputs=unet_inputs,
                                           guidance_rescale=guidance_rescale)
        if classifier_labels is None:
            return text_guided
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")

        def model_fn(state, sample, i):
            out, extras = text_guided(state, sample, i)
            x, alpha_bar = self.alpha_space(state, sample, i)
            grad = self.classifier_gradient(params["classifier"], x, state.timesteps[i], classifier_labels)
            return classifier_guidance(out, grad, classifier_scale, alpha_bar, prediction_type), extras

        return model_fn

    # ------------------------------------------------------------------ calling
    def __call__(self, prompt_ids, params, prng_seed, num_inference_steps: int = 50,
                 guidance_scale: float | jax.Array = 7.5, height: int | None = None, width: int | None = None,
                 latents=None, neg_prompt_ids=None, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None,
                 check_finite: bool = True, *, labels=None, classifier_scale: float | jax.Array = DEFAULT_CLASSIFIER_SCALE):
        """FlaxStableDiffusionPipeline's call (jit=True: pmap; mesh=: sharded) with classifier guidance.

        labels: {head: label} for every prompt, a list of such dicts (one per prompt), or int indices
            [B, n_heads] ([n_devices, per_device, n_heads] with jit=True); -1 (or "none") leaves a head out.
        classifier_scale: s, a number or one per prompt; traced (no recompile); 0 is unguided sampling.
        An empty prompt (pipe.prepare_inputs([""] * B)) is classifier guidance alone."""
        settings, inputs = self.prepare_call(prompt_ids, params, prng_seed, num_inference_steps, guidance_scale,
                                             height, width, latents, neg_prompt_ids, jit, mesh, return_trajectory,
                                             output_attentions)
        batch_shape = inputs["prompt_ids"].shape[:-1]
        inputs["classifier_labels"] = self.check_labels(labels, batch_shape)
        inputs["classifier_scale"] = self.check_guidance(classifier_scale, batch_shape, name="classifier_scale")
        outputs = self._run(settings, inputs, params, prng_seed, jit=jit, mesh=mesh)
        return self.finish(outputs, params, jit, decode_trajectory=decode_trajectory, check_finite=check_finite)
