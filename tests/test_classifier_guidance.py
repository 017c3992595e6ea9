"""Classifier guidance: the noise-conditional classifier, its gradient, the guided pipeline (one scan, traced labels
and scale, pmap and mesh), the training stage (resume), and bad inputs at the API and the command line.

A tiny random classifier on the tiny random pipeline (tests/conftest.py) keeps this file fast.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import (ConfigError, FlaxStableDiffusionClassifierGuidedPipeline, FlaxStableDiffusionPipeline, InputError,
                   NoiseClassifier)
from sdjax.guidance import classifier_guidance
from sdjax.models.noise_classifier import NO_LABEL, label_log_prob
from sdjax.pipelines.engine import run_jit
from sdjax.testing import rel_err

from .badinput import run_cli

SIZE = 32  # the tiny pipeline's images; latents 4 x 16 x 16
TINY_CLASSIFIER = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, heads=("color", "shape"),
                       num_labels=(3, 2), label_names=("red", "green", "blue", "circle", "square"))
PROMPTS = ["", "a red circle"]


def perturbed(params, seed: int):
    """Random init plus noise: biases and norms away from 0 and 1, so a wrong wiring cannot hide."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def tiny_classifier():
    clf = NoiseClassifier(**TINY_CLASSIFIER)
    return clf, perturbed(clf.init_weights(jax.random.PRNGKey(0)), 1)


@pytest.fixture(scope="module")
def guided(tiny_pipeline, tiny_classifier):
    """(plain pipeline, guided pipeline, params with the classifier's)."""
    sd, params = tiny_pipeline
    clf, clf_params = tiny_classifier
    return sd, FlaxStableDiffusionClassifierGuidedPipeline.from_pipe(sd, classifier=clf), {**params,
                                                                                            "classifier": clf_params}


@pytest.fixture(scope="module")
def classifier_folder(tiny_classifier, tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    tiny_classifier[0].save_pretrained(folder, tiny_classifier[1])
    return folder


def latents(batch, seed=3):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (batch, 4, SIZE // 2, SIZE // 2)), np.float32)


# ---------------------------------------------------------------------- the classifier
def test_classifier_config_labels_and_save_roundtrip(tiny_classifier, classifier_folder):
    clf, params = tiny_classifier
    assert clf.head_labels() == {"color": ("red", "green", "blue"), "shape": ("circle", "square")}
    ids = clf.label_indices([{"color": "blue"}, {"shape": "square", "color": "none"}, {"color": 0, "shape": -1}])
    np.testing.assert_array_equal(ids, [[2, NO_LABEL], [NO_LABEL, 1], [0, NO_LABEL]])
    assert clf.label_dict(ids[0]) == {"color": "blue"}
    loaded, loaded_params = NoiseClassifier.from_pretrained(classifier_folder)
    assert loaded == clf and hash(loaded) == hash(clf)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(loaded_params)))
    config = json.loads((classifier_folder / "config.json").read_text())
    assert config["heads"] == ["color", "shape"] and config["label_names"][-1] == "square"
    for bad, match in [(dict(num_labels=(3,)), "has 1 entries for 2 heads"),
                       (dict(label_names=("a", "b")), "needs 5"),
                       (dict(heads=("color", "color")), "names a head twice"),
                       (dict(label_names=("red", "red", "blue", "circle", "square")), "names a label twice"),
                       (dict(label_names=("red", "none", "blue", "circle", "square")), "'none'"),
                       (dict(label_names=("red", "a,b", "blue", "circle", "square")), "without ',' or '='"),
                       (dict(block_out_channels=(6, 16)), "multiples of norm_num_groups"),
                       (dict(num_labels=(3, "2")), "expected a list of int")]:
        with pytest.raises(ConfigError, match=match):
            NoiseClassifier(**(TINY_CLASSIFIER | bad))


def test_label_log_prob_sums_the_heads_used(tiny_classifier):
    clf, params = tiny_classifier
    x = jnp.asarray(latents(3))
    logits = clf.apply({"params": params}, x, jnp.array([10, 500, 990]))
    color, shape = jax.nn.log_softmax(logits[:, :3]), jax.nn.log_softmax(logits[:, 3:])
    labels = jnp.array([[2, 1], [0, NO_LABEL], [NO_LABEL, NO_LABEL]])
    got = np.asarray(label_log_prob(logits, labels, clf.num_labels))
    np.testing.assert_allclose(got, [color[0, 2] + shape[0, 1], color[1, 0], 0.0], rtol=1e-6)


def test_gradient_matches_central_differences(guided):
    """grad_x log p(y | x_t, t) against (f(x + eps v) - f(x - eps v)) / 2 eps, f = sum_b log p(y_b | x_b, t_b).

    float32 throughout, eps = 3e-2 on latents of std 1. Error budget, measured against |g| (~0.09 here): the
    rounding of the difference, ~ |f| * 6e-8 / eps = 3 * 6e-8 / 3e-2 ~ 6e-6 ~ 7e-5 |g|, falls as 1/eps (measured
    1.5e-3 |g| at eps 1e-3, 1.6e-4 at 1e-2, 4.5e-5 at 3e-2); the truncation error (eps^2 / 6 times the third
    derivative) shows only from eps ~ 0.3 (2.7e-4 along g). The tolerance, 1e-3 |g|, is 20x the measured error; a
    gradient wrong by 5% of |g| anywhere (a coordinate block, one sample, a sign) moves its projection on a random
    unit direction of these 2048 by ~|dg| / 45 and fails. Along g itself the check is relative (measured 3e-5)."""
    _, pipe, params = guided
    clf_params = params["classifier"]
    x = jnp.asarray(latents(2, seed=5))
    t = jnp.array([400, 150])
    labels = jnp.array([[1, 0], [2, NO_LABEL]])
    grad = pipe.classifier_gradient(clf_params, x, t, labels)
    norm = float(jnp.linalg.norm(grad))
    f = jax.jit(lambda x: jnp.sum(pipe.classifier_log_prob(clf_params, x, t, labels)))
    eps, errors = 3e-2, []
    directions = [grad / norm]
    for k in range(8):
        v = jax.random.normal(jax.random.PRNGKey(100 + k), x.shape)
        if k >= 6:  # one sample at a time: each sample's gradient is its own (no batch coupling)
            v = v.at[k - 6].set(0.0)
        directions.append(v / jnp.linalg.norm(v))
    for v in directions:
        numeric = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
        errors.append(float(abs(numeric - jnp.vdot(grad, v))) / norm)
    print(f"|g| = {norm:.3g}; central-difference error / |g|:", ["%.1e" % e for e in errors])
    assert max(errors) < 1e-3, errors
    # no labels: log p = 0, no gradient
    assert not np.any(np.asarray(pipe.classifier_gradient(clf_params, x, t, jnp.full((2, 2), NO_LABEL))))


def test_guidance_formula_for_every_parameterization():
    """eps_hat = eps - s sqrt(1 - alpha_bar) g, and v / sample outputs shifted so that they imply the same x̂0."""
    key = jax.random.split(jax.random.PRNGKey(0), 4)
    x, eps, grad = (jax.random.normal(k, (2, 4, 3, 3)) for k in key[:3])
    scale, alpha_bar = jnp.array([0.0, 3.0]), jnp.float32(0.3)
    a, b = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
    eps_hat = classifier_guidance(eps, grad, scale, alpha_bar, "epsilon")
    np.testing.assert_array_equal(eps_hat[0], eps[0])  # s = 0: bit for bit
    np.testing.assert_allclose(eps_hat[1], eps[1] - 3.0 * b * grad[1], rtol=1e-6)
    x0_hat = (x - b * eps_hat) / a
    x0 = (x - b * eps) / a
    v = a * eps - b * x0
    v_hat = classifier_guidance(v, grad, scale, alpha_bar, "v_prediction")
    np.testing.assert_allclose(a * x - b * v_hat, x0_hat, atol=1e-5)  # x̂0 from v
    np.testing.assert_allclose(classifier_guidance(x0, grad, scale, alpha_bar, "sample"), x0_hat, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        classifier_guidance(eps, grad, scale, alpha_bar, "flow")


@pytest.mark.parametrize("scheduler", ["pndm", "euler"])
def test_model_fn_adds_the_scaled_gradient_at_the_alpha_space_sample(guided, scheduler):
    """One model call of the guided model_fn = the text-guided one - s sqrt(1 - alpha_bar) g(x_t in alpha space)."""
    _, pipe, params = guided
    pipe = pipe.with_scheduler(scheduler)
    sched = pipe.scheduler
    state = sched.set_timesteps(5, (2, 4, 16, 16))
    context = pipe.text_context(params, jnp.asarray(pipe.prepare_inputs(PROMPTS)),
                                jnp.asarray(pipe.unconditional_ids(2)))
    labels, scale = jnp.array([[0, 1], [2, NO_LABEL]]), jnp.array([2.0, 5.0])
    sample = jnp.asarray(latents(2)) * sched.init_noise_sigma(state)
    i = 1
    plain, _ = pipe.guided_model(params, context, 4.0)(state, sample, i)
    out, _ = pipe.guided_model(params, context, 4.0, classifier_labels=labels, classifier_scale=scale)(state, sample, i)
    level = float(sched.sigma_or_noise_level(state, i))
    alpha_bar = 1 / (1 + level**2) if sched.sigma_space else 1 - level**2
    x = sample * np.sqrt(alpha_bar) if sched.sigma_space else sample
    grad = pipe.classifier_gradient(params["classifier"], x, state.timesteps[i], labels)
    expected = plain - scale[:, None, None, None] * np.sqrt(1 - alpha_bar) * grad
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(out - plain).max()) > 1e-3


# ---------------------------------------------------------------------- the pipeline
def test_scale_zero_is_unguided_sampling_bit_for_bit(guided):
    sd, pipe, params = guided
    ids = pipe.prepare_inputs(PROMPTS)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE, latents=latents(2))
    plain = sd(ids, params, jax.random.PRNGKey(0), **kw)
    zero = pipe(ids, params, jax.random.PRNGKey(0), labels={"color": "red", "shape": "square"}, classifier_scale=0.0,
                **kw)
    for a, b in [(plain.images, zero.images), (plain.trajectory.latents, zero.trajectory.latents),
                 (plain.trajectory.pred_original_samples, zero.trajectory.pred_original_samples)]:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # one scale per prompt: the prompt with s = 0 is still exactly the unguided one, the other is steered
    mixed = pipe(ids, params, jax.random.PRNGKey(0), labels={"color": "red"}, classifier_scale=[0.0, 20.0], **kw)
    np.testing.assert_array_equal(np.asarray(mixed.trajectory.latents[:, 0]), np.asarray(plain.trajectory.latents[:, 0]))
    assert float(jnp.abs(mixed.trajectory.latents[-1, 1] - plain.trajectory.latents[-1, 1]).max()) > 1e-2
    # the trajectory and x̂0 are there as for text-to-image
    assert mixed.trajectory.pred_original_samples.shape == plain.trajectory.pred_original_samples.shape


def _scan_lengths(jaxpr) -> list[int]:
    """Lengths of the scans in a jaxpr, looking inside the pjit/closed sub-jaxprs but not inside a scan's body."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn.params["length"])
            continue
        for value in eqn.params.values():
            sub = getattr(value, "jaxpr", value)
            if hasattr(sub, "eqns"):
                out += _scan_lengths(sub)
    return out


def test_one_scan_and_no_recompile_when_scale_or_labels_change(guided):
    from sdjax.pipelines.engine import Settings

    _, pipe, params = guided
    steps = 3
    ids = pipe.prepare_inputs(PROMPTS)
    settings = Settings(num_inference_steps=steps, height=SIZE, width=SIZE)
    inputs = {"prompt_ids": jnp.asarray(ids), "neg_prompt_ids": jnp.asarray(pipe.unconditional_ids(2)),
              "guidance_scale": jnp.full((2,), 5.0), "classifier_labels": jnp.zeros((2, 2), jnp.int32),
              "classifier_scale": jnp.ones((2,))}
    jaxpr = jax.make_jaxpr(run_jit, static_argnums=(0, 1))(pipe, settings, inputs, params, jax.random.PRNGKey(0))
    n_calls = pipe.scheduler.set_timesteps(steps, (2, 4, 16, 16)).timesteps.shape[0]
    assert _scan_lengths(jaxpr.jaxpr) == [n_calls], "classifier guidance runs inside the one scan over the steps"

    kw = dict(num_inference_steps=steps, height=SIZE, width=SIZE, latents=latents(2))  # the program of the test above
    before = run_jit._cache_size()
    pipe(ids, params, jax.random.PRNGKey(0), labels={"color": "red"}, classifier_scale=1.0, **kw)
    size = run_jit._cache_size()
    assert size <= before + 1
    pipe(ids, params, jax.random.PRNGKey(0), labels={"color": "blue", "shape": "circle"}, classifier_scale=7.0, **kw)
    pipe(ids, params, jax.random.PRNGKey(1), labels=[{"shape": "square"}, {}], classifier_scale=[0.0, 3.0], **kw)
    pipe(ids, params, jax.random.PRNGKey(1), labels=np.array([[2, -1], [1, 0]]), guidance_scale=2.0, **kw)
    type(pipe).from_pipe(pipe)(ids, params, jax.random.PRNGKey(2), labels={"color": "green"}, **kw)
    assert run_jit._cache_size() == size, "labels and scales are traced: no new program"


@pytest.mark.slow
def test_pmap_and_mesh_match_single_device(guided):
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard
    from jax.sharding import Mesh

    _, pipe, params = guided
    n_dev = jax.local_device_count()
    assert n_dev >= 4, "conftest sets 8 host CPU devices"
    ids = pipe.prepare_inputs((PROMPTS * n_dev)[:n_dev])
    colors = ["red", "green", "blue"]
    labels = pipe.prepare_labels([{"color": colors[i % 3], "shape": "none" if i % 2 else "square"}
                                  for i in range(n_dev)])
    scales = np.linspace(0.0, 8.0, n_dev).astype(np.float32)
    lat = latents(n_dev, seed=4)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, height=SIZE, width=SIZE)
    single = pipe(ids, params, jax.random.PRNGKey(0), latents=lat, labels=labels, classifier_scale=scales, **kw)

    pmapped = pipe(shard(ids), replicate(params), jax.random.split(jax.random.PRNGKey(0), n_dev), latents=shard(lat),
                   labels=shard(labels), classifier_scale=shard(scales), jit=True, **kw)
    assert pmapped.images.shape == (n_dev, 1, SIZE, SIZE, 3)
    np.testing.assert_allclose(np.asarray(pmapped.images).reshape(single.images.shape), single.images, atol=1e-5)
    x0_pmap = np.swapaxes(np.asarray(pmapped.trajectory.pred_original_samples), 0, 1).reshape(
        single.trajectory.pred_original_samples.shape)
    assert rel_err(x0_pmap, single.trajectory.pred_original_samples) <= 1e-5

    mesh = Mesh(np.array(jax.devices()), ("data",))
    meshed = pipe(ids, params, jax.random.PRNGKey(0), latents=lat, labels=labels, classifier_scale=scales, mesh=mesh,
                  **kw)
    np.testing.assert_allclose(np.asarray(meshed.images), single.images, atol=1e-5)
    assert rel_err(meshed.trajectory.pred_original_samples, single.trajectory.pred_original_samples) <= 1e-5
    assert len(meshed.images.sharding.device_set) == n_dev


def test_from_pretrained_and_save_pretrained(guided, tiny_folder, classifier_folder, tmp_path):
    _, pipe, params = guided
    loaded, loaded_params = FlaxStableDiffusionClassifierGuidedPipeline.from_pretrained(
        tiny_folder, classifier=classifier_folder)
    assert loaded == pipe and set(loaded_params) == {"unet", "vae", "text_encoder", "classifier"}
    pipe.save_pretrained(tmp_path / "p", params)
    again, _ = FlaxStableDiffusionClassifierGuidedPipeline.from_pretrained(tmp_path / "p")  # its classifier/
    assert again == pipe
    plain, _ = FlaxStableDiffusionPipeline.from_pretrained(tmp_path / "p")  # still an ordinary SD folder
    assert type(plain) is FlaxStableDiffusionPipeline


# ---------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kw,match", [
    (dict(labels=None), "`labels` is required"),
    (dict(labels={"colour": "red"}), "unknown classifier head(s) 'colour'; the classifier's heads: color, shape"),
    (dict(labels={"color": "purple"}), "unknown label 'purple' for head 'color'; its labels: red, green, blue"),
    (dict(labels=[{"color": "red"}]), "`labels` has 1 dicts for a batch of 2"),
    (dict(labels=np.zeros((2, 3), np.int32)), "`labels` must be int label indices (2, 2)"),
    (dict(labels=np.zeros((2, 2), np.float32)), "`labels` must be int label indices"),
    (dict(labels=np.array([[0, 2], [0, 0]])), "`labels` holds 2 for head 'shape', outside [-1, 2)"),
    (dict(labels=np.array([[-2, 0], [0, 0]])), "`labels` holds -2 for head 'color'"),
    (dict(labels={"color": "red"}, classifier_scale=float("nan")), "`classifier_scale` must be finite"),
    (dict(labels={"color": "red"}, classifier_scale=[1.0, 2.0, 3.0]), "`classifier_scale` has shape (3,)"),
])
def test_bad_call_arguments(guided, kw, match):
    _, pipe, params = guided
    before = run_jit._cache_size()
    with pytest.raises(InputError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        pipe(pipe.prepare_inputs(PROMPTS), params, jax.random.PRNGKey(0), num_inference_steps=2, height=SIZE,
             width=SIZE, **kw)
    assert run_jit._cache_size() == before, "refused before anything is compiled"


def test_bad_construction(guided, tiny_classifier):
    sd, pipe, params = guided
    with pytest.raises(InputError, match="needs classifier=NoiseClassifier"):
        FlaxStableDiffusionClassifierGuidedPipeline.from_pipe(sd)
    with pytest.raises(ConfigError, match="takes 3-channel latents, the UNet makes 4"):
        FlaxStableDiffusionClassifierGuidedPipeline.from_pipe(sd, classifier=NoiseClassifier(
            **(TINY_CLASSIFIER | dict(in_channels=3))))
    with pytest.raises(ConfigError, match="trained on 500 timesteps, the scheduler has 1000"):
        FlaxStableDiffusionClassifierGuidedPipeline.from_pipe(sd, classifier=NoiseClassifier(
            **(TINY_CLASSIFIER | dict(num_train_timesteps=500))))
    no_classifier = {k: v for k, v in params.items() if k != "classifier"}
    with pytest.raises(InputError, match="`params` has no 'classifier'"):
        pipe(pipe.prepare_inputs(PROMPTS), no_classifier, jax.random.PRNGKey(0), num_inference_steps=2,
             labels={"color": "red"})


@pytest.fixture()
def home(tmp_path, tiny_folder, classifier_folder):
    import shutil

    shutil.copytree(tiny_folder, tmp_path / "model")
    shutil.copytree(classifier_folder, tmp_path / "clf")
    (tmp_path / "notes.txt").write_text("my notes")
    return tmp_path


@pytest.mark.parametrize("extra,expect", [
    (("--labels", "color", "--classifier", "CLF"), "argument --labels: expected HEAD=LABEL[,HEAD=LABEL...]"),
    (("--labels", "color=red,,shape=circle", "--classifier", "CLF"), "argument --labels: expected HEAD=LABEL"),
    (("--labels", "color=red,color=blue", "--classifier", "CLF"), "argument --labels: head 'color' is given twice"),
    (("--labels", "color=red", "--classifier", "CLF", "--classifier-scale", "nan"),
     "argument --classifier-scale: expected a finite number"),
    (("--labels", "colour=red", "--classifier", "CLF"), "unknown classifier head(s) 'colour'; the classifier's heads: "
                                                        "color, shape"),
    (("--labels", "color=purple", "--classifier", "CLF"), "unknown label 'purple' for head 'color'; its labels: red, "
                                                          "green, blue"),
    (("--labels", "color=red", "--classifier", "NOPE"), "model folder not found"),
    (("--classifier-scale", "2"), "--classifier-scale needs --labels HEAD=LABEL,..."),
    (("--classifier", "CLF"), "--classifier needs --labels HEAD=LABEL,..."),
    (("--labels", "color=red"), "--labels needs --classifier PATH"),  # not the toy model: no default classifier
])
def test_cli_errors(capsys, home, extra, expect):
    extra = [str(home / "clf") if a == "CLF" else str(home / "nope") if a == "NOPE" else a for a in extra]
    argv = ["generate", "--model", home / "model", "--prompt", "", "--steps", "2", "--out", home / "out", *extra]
    run_cli(capsys, argv, home, expect)
    assert not (home / "out").exists(), "nothing written for a refused command"


@pytest.mark.slow
def test_cli_generate_with_labels_is_the_api_result(home):
    from sdjax.cli import main
    from sdjax.seeds import initial_noise, loop_key, sample_seeds

    out = home / "out"
    argv = ["generate", "--model", home / "model", "--classifier", home / "clf", "--prompt", "", "--labels",
            "color=blue,shape=square", "--classifier-scale", "6", "--num-images", "2", "--steps", "3", "--seed", "5",
            "--out", out]
    assert main([str(a) for a in argv]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["labels"] == {"color": "blue", "shape": "square"} and settings["classifier_scale"] == 6.0
    pipe, params = FlaxStableDiffusionClassifierGuidedPipeline.from_pretrained(home / "model", classifier=home / "clf")
    lat = initial_noise(sample_seeds(5, range(2)), pipe.latent_shape(1, SIZE, SIZE)[1:])
    api = pipe(pipe.prepare_inputs(["", ""]), params, loop_key(5), num_inference_steps=3, guidance_scale=7.5,
               latents=lat, labels={"color": "blue", "shape": "square"}, classifier_scale=6.0)
    from PIL import Image

    png = np.asarray(Image.open(out / "image-001.png"), np.float32) / 255
    assert np.abs(png - np.asarray(api.images[1])).max() <= 1 / 255 + 1e-6


# ---------------------------------------------------------------------- training
def tiny_train_config(tiny_folder, **over):
    from sdjax.train import classifier
    from sdjax.train.config import load_config

    values = dict(model=str(tiny_folder), num_train_images=32, num_eval_images=8, batch_size=8, num_steps=12,
                  classifier=dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4),
                  learning_rate=3e-3, warmup_steps=1, checkpoint_every=4, keep_checkpoints=3, log_every=1,
                  eval_timesteps=[0, 999]) | over
    return load_config(classifier.Config, "shapes_classifier", values)


def test_shipped_config_and_config_errors(tiny_folder):
    from sdjax.train import classifier
    from sdjax.train.config import load_config

    cfg = load_config(classifier.Config, "shapes_classifier")
    assert cfg.model is None and cfg.classifier["block_out_channels"]
    with pytest.raises(ConfigError, match="only 'shapes' has them"):
        tiny_train_config(tiny_folder, dataset="folder:/tmp")
    with pytest.raises(ConfigError, match="'block_out_channel' is not a NoiseClassifier config key .*did you mean"):
        tiny_train_config(tiny_folder, classifier=dict(block_out_channel=[8]))
    with pytest.raises(ConfigError, match="'heads' is filled in"):
        tiny_train_config(tiny_folder, classifier=dict(heads=["color"]))
    with pytest.raises(ConfigError, match="eval_timesteps"):
        tiny_train_config(tiny_folder, eval_timesteps=[])


def test_shipped_classifier_fits_the_shipped_toy_model():
    from sdjax.assets import toy_classifier_path, toy_model_path
    from sdjax.train.config import load_config
    from sdjax.train import classifier

    pipe, params = FlaxStableDiffusionClassifierGuidedPipeline.from_pretrained(toy_model_path(),
                                                                               classifier=toy_classifier_path())
    clf = pipe.classifier
    assert clf.heads == ("color", "shape", "background") and clf.num_labels == (6, 3, 3)
    assert pipe.prepare_labels({"color": "red", "shape": "none", "background": "black"}, 1).tolist() == [[0, -1, 1]]
    summary = json.loads((toy_classifier_path() / "summary.json").read_text())
    cfg = load_config(classifier.Config, "shapes_classifier")  # the shipped config trained the shipped classifier
    assert summary["steps"] == cfg.num_steps and summary["batch_size"] == cfg.batch_size
    assert list(clf.block_out_channels) == cfg.classifier["block_out_channels"]
    assert summary["held_out_accuracy"]["0"]["color"] >= 0.95


@pytest.mark.slow
def test_training_resumes_to_the_same_parameters_and_exports(tiny_folder, tmp_path):
    from sdjax.train import classifier
    from sdjax.train.checkpointing import Checkpointer

    cfg = tiny_train_config(tiny_folder)
    straight = classifier.train_and_evaluate(cfg, tmp_path / "straight", progress=False)
    assert straight["step_compiles_this_run"] == 1 and set(straight["held_out_accuracy"]) == {"0", "999"}
    # interrupted after step 10 without saving (as kill -9 does): checkpoint 8 is the newest
    classifier.train_and_evaluate(cfg, tmp_path / "resumed", until_step=10, final_save=False, progress=False,
                                  export=False)
    assert Checkpointer(tmp_path / "resumed", 4, 3).latest_step() == 8
    resumed = classifier.train_and_evaluate(cfg, tmp_path / "resumed", progress=False)
    assert resumed["step_compiles_this_run"] == 0, "same setup in the same process: JAX's cache, no compile"

    a = NoiseClassifier.from_pretrained(tmp_path / "straight" / "classifier")
    b = NoiseClassifier.from_pretrained(tmp_path / "resumed" / "classifier")
    assert a[0] == b[0] and a[0].heads == ("color", "shape", "background") and a[0].in_channels == 4
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a[1]), jax.tree_util.tree_leaves(b[1])))
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, cfg.num_steps + 1))
    # the export command writes the same classifier from the workdir; the pipeline takes it for the tiny model
    from sdjax.cli import main

    assert main(["train", "export", "--workdir", str(tmp_path / "resumed"), "--out", str(tmp_path / "exported")]) == 0
    # the stage-2 export options mean nothing for a classifier: refused, nothing written
    assert main(["train", "export", "--workdir", str(tmp_path / "resumed"), "--out", str(tmp_path / "x"),
                 "--no-ema"]) == 2
    assert not (tmp_path / "x").exists()
    c = NoiseClassifier.from_pretrained(tmp_path / "exported")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a[1]), jax.tree_util.tree_leaves(c[1])))
    assert json.loads((tmp_path / "exported" / "summary.json").read_text())["steps"] == cfg.num_steps
    FlaxStableDiffusionClassifierGuidedPipeline.from_pretrained(tiny_folder, classifier=tmp_path / "exported")


# ---------------------------------------------------------------------- the guidance study's report
def test_guidance_study_report_keeps_the_prose_and_writes_table_and_plots(tmp_path):
    from types import SimpleNamespace

    from sdjax.train import data as data_lib
    from sdjax.train import guidance_study

    rng = np.random.default_rng(0)
    rows = {name: s | {"adherence": {h: float(rng.uniform()) for h in ("color", "shape", "background")},
                       "fd": float(rng.uniform(100, 1000))} for name, s in guidance_study.settings().items()}
    steps = {name: {"target": {h: list(rng.uniform(size=5)) for h in ("color", "shape", "background")},
                    "final": {h: list(rng.uniform(size=5)) for h in ("color", "shape", "background")}}
             for name in guidance_study.STEP_SETTINGS}
    results = {"meta": {"per_caption": 1, "steps": 5}, "settings": rows, "steps": steps, "fd_real_vs_real": 50.0,
               "evaluation_classifier_held_out_accuracy": {"color": 1.0, "shape": 0.99, "background": 1.0}}
    pictures = {name: rng.uniform(size=(5, 2, 8, 8, 3)) for name in guidance_study.STEP_SETTINGS}
    study = SimpleNamespace(captions=[c for _, c in data_lib.all_shape_captions()])
    md = tmp_path / "guidance.md"
    md.write_text("# Intro\n\nprose\n\n<!-- results -->\nold table\n<!-- /results -->\n\n## Reading\nmore prose\n")
    guidance_study.write_report(results, md, pictures, study)
    text = md.read_text()
    assert text.startswith("# Intro\n\nprose\n") and text.endswith("## Reading\nmore prose\n")
    assert "old table" not in text and text.count("<!-- results -->") == 1
    assert all(f"| {name} |" in text for name in rows)
    for suffix in ("", "_steps", "_completions"):
        assert (tmp_path / f"guidance{suffix}.png").stat().st_size > 1000
