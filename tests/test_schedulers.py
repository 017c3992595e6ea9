"""sdjax schedulers vs diffusers' PyTorch schedulers (the reference), driven by the same deterministic
stand-in model through whole sampling loops; plus scan-vs-loop, API and config-error checks.

x̂0 reference: diffusers' ``pred_original_sample`` where ``step`` returns it (DDPM, DDIM, Euler,
Euler ancestral, LMS, Heun); for DPM-Solver++ the converted model output the solver stores
(``scheduler.model_outputs[-1]``); for PNDM, which returns none, the standard formula applied to the
reference's own model output at the timestep/sample the model was evaluated at.
"""

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sdjax.errors import SdjaxError
from sdjax.schedulers import (
    SCHEDULERS,
    ConfigError,
    get_scheduler,
    load_scheduler,
)
from sdjax.testing import rel_err

torch = pytest.importorskip("torch", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")
diffusers = pytest.importorskip("diffusers", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

SHAPE = (2, 4, 8, 8)
TOL = 1e-5

DIFFUSERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm_solver_pp_2m": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}
DIFFUSERS_MODULE = {
    "ddpm": "scheduling_ddpm",
    "euler_ancestral": "scheduling_euler_ancestral_discrete",
}

# Stable Diffusion 1.x's training schedule (its PNDM config ships skip_prk_steps + steps_offset=1)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
BASE = {
    "ddpm": dict(SD, clip_sample=False),
    "ddim": dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "pndm": dict(SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
    "euler": dict(SD),
    "euler_ancestral": dict(SD),
    "lms": dict(SD),
    "dpm_solver_pp_2m": dict(SD),
    "heun": dict(SD),
}


# ---------------------------------------------------------------------------------------- stand-in model
def model_torch(x, t):
    c = torch.as_tensor(t, dtype=torch.float32) / 1000.0
    return torch.tanh(x) * (0.6 + 0.4 * c) + 0.2 * torch.sin(2.3 * x + 3.0 * c)


def model_jax(x, t):
    c = jnp.asarray(t, jnp.float32) / 1000.0
    return jnp.tanh(x) * (0.6 + 0.4 * c) + 0.2 * jnp.sin(2.3 * x + 3.0 * c)


def init_noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def step_noises(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n,) + SHAPE).astype(np.float32)


# ---------------------------------------------------------------------------------------- reference loop
def run_reference(name, config, n, noises=None, eta=0.0, monkeypatch=None):
    cls = getattr(diffusers, DIFFUSERS[name])
    sched = cls.from_config(config)
    sched.set_timesteps(n)
    current = {}
    if name in DIFFUSERS_MODULE:
        mod = getattr(diffusers.schedulers, DIFFUSERS_MODULE[name])
        monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: current["noise"].clone())
    x = torch.from_numpy(init_noise()) * sched.init_noise_sigma
    xs, x0s = [], []
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        mo = model_torch(x_in, t)
        kw = {}
        if noises is not None:
            current["noise"] = torch.from_numpy(noises[i])
            if name == "ddim":
                kw = dict(eta=eta, variance_noise=current["noise"])
        elif name == "ddim" and eta:
            kw = dict(eta=eta)
        if name == "ddim" and config.get("use_clipped_model_output"):
            kw["use_clipped_model_output"] = True
        out = sched.step(mo, t, x, **kw)
        if name == "pndm":
            a = sched.alphas_cumprod[int(t)]
            if sched.config.prediction_type == "epsilon":
                x0 = (x - (1 - a) ** 0.5 * mo) / a**0.5
            else:
                x0 = a**0.5 * x - (1 - a) ** 0.5 * mo
        elif name == "dpm_solver_pp_2m":
            x0 = sched.model_outputs[-1]
        else:
            x0 = out.pred_original_sample
        x = out.prev_sample
        xs.append(x.numpy().copy())
        x0s.append(x0.numpy().copy())
    return dict(
        timesteps=sched.timesteps.numpy(),
        init_noise_sigma=float(sched.init_noise_sigma),
        xs=np.stack(xs),
        x0s=np.stack(x0s),
    )


# ---------------------------------------------------------------------------------------- sdjax loops
def sdjax_body(sched, x, state, k, noise):
    x_in = sched.scale_model_input(state, x, k)
    mo = model_jax(x_in, state.timesteps[k])
    return sched.step(state, mo, k, x, noise=noise)


def run_scan(sched, n, noises=None):
    state = sched.set_timesteps(n, SHAPE)
    calls = sched.num_model_calls(state)
    if noises is None:
        noises = np.zeros((calls,) + SHAPE, np.float32)

    @jax.jit
    def loop(state, x, noises):
        def body(carry, inp):
            state, x = carry
            k, z = inp
            state, x, x0 = sdjax_body(sched, x, state, k, z)
            return (state, x), (x, x0)

        _, (xs, x0s) = jax.lax.scan(body, (state, x), (jnp.arange(calls), noises))
        return xs, x0s

    x = jnp.asarray(init_noise()) * sched.init_noise_sigma(state)
    xs, x0s = loop(state, x, jnp.asarray(noises))
    return dict(
        timesteps=np.asarray(state.timesteps),
        init_noise_sigma=float(sched.init_noise_sigma(state)),
        xs=np.asarray(xs),
        x0s=np.asarray(x0s),
    )


def run_python_loop(sched, n, noises=None):
    state = sched.set_timesteps(n, SHAPE)
    x = jnp.asarray(init_noise()) * sched.init_noise_sigma(state)
    xs, x0s = [], []
    for k in range(sched.num_model_calls(state)):
        z = None if noises is None else jnp.asarray(noises[k])
        state, x, x0 = sdjax_body(sched, x, state, k, z)
        xs.append(np.asarray(x))
        x0s.append(np.asarray(x0))
    return dict(xs=np.stack(xs), x0s=np.stack(x0s))


MAX_ERRS = {}  # (case id) -> (max rel err samples, max rel err x0), printed at the end with -s


def compare(name, config, n, case=None, eta=0.0, monkeypatch=None, tol=TOL):
    ours = get_scheduler(name, base_config=config, **({"eta": eta} if eta else {}))
    noises = None
    if ours.stochastic:
        state = ours.set_timesteps(n, SHAPE)
        noises = step_noises(ours.num_model_calls(state))
    ref = run_reference(name, dict(config), n, noises=noises, eta=eta, monkeypatch=monkeypatch)
    got = run_scan(ours, n, noises)
    # karras/exponential timesteps come from log(sigma) interpolation: equal up to float32 rounding
    np.testing.assert_allclose(got["timesteps"].astype(np.float64), ref["timesteps"].astype(np.float64), rtol=1e-6)
    assert got["xs"].shape == ref["xs"].shape, (got["xs"].shape, ref["xs"].shape)
    np.testing.assert_allclose(got["init_noise_sigma"], ref["init_noise_sigma"], rtol=1e-6)
    ex = [rel_err(a, b) for a, b in zip(got["xs"], ref["xs"])]
    e0 = [rel_err(a, b) for a, b in zip(got["x0s"], ref["x0s"])]
    MAX_ERRS[case or f"{name}-{n}"] = (max(ex), max(e0))
    assert max(ex) <= tol, f"samples: max rel err {max(ex):.2e} at step {int(np.argmax(ex))}"
    assert max(e0) <= tol, f"x0: max rel err {max(e0):.2e} at step {int(np.argmax(e0))}"


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MAX_ERRS:
        print("\nmax relative errors (samples, x0):")
        for k, (a, b) in sorted(MAX_ERRS.items()):
            print(f"  {k:55s} {a:.2e} {b:.2e}")


# ---------------------------------------------------------------------------------------- parity tests
@pytest.mark.parametrize("n", [10, 25, 50])
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_parity_epsilon(name, n, monkeypatch):
    compare(name, BASE[name], n, monkeypatch=monkeypatch)


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_parity_v_prediction(name, monkeypatch):
    compare(name, dict(BASE[name], prediction_type="v_prediction"), 10, f"{name}-v", monkeypatch=monkeypatch)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "lms", "dpm_solver_pp_2m", "heun"])
def test_parity_sample_prediction(name, monkeypatch):
    compare(name, dict(BASE[name], prediction_type="sample"), 10, f"{name}-sample", monkeypatch=monkeypatch)


CONFIG_CASES = [
    # timestep spacings / offsets
    ("ddim", dict(timestep_spacing="trailing", steps_offset=0), 25),
    ("ddim", dict(timestep_spacing="linspace", steps_offset=0), 10),
    ("ddpm", dict(timestep_spacing="trailing"), 10),
    ("ddpm", dict(timestep_spacing="linspace"), 10),
    ("pndm", dict(timestep_spacing="trailing", steps_offset=0), 25),
    ("pndm", dict(timestep_spacing="linspace", steps_offset=0), 10),
    ("euler", dict(timestep_spacing="leading", steps_offset=1), 25),
    ("euler", dict(timestep_spacing="trailing"), 10),
    ("euler_ancestral", dict(timestep_spacing="leading", steps_offset=1), 10),
    ("euler_ancestral", dict(timestep_spacing="trailing"), 10),
    ("lms", dict(timestep_spacing="leading", steps_offset=1), 10),
    ("heun", dict(timestep_spacing="trailing"), 10),
    ("heun", dict(timestep_spacing="leading", steps_offset=1), 10),
    ("dpm_solver_pp_2m", dict(timestep_spacing="leading", steps_offset=1), 25),
    ("dpm_solver_pp_2m", dict(timestep_spacing="trailing"), 10),
    # beta schedules
    ("ddim", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 10),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2"), 10),
    ("euler", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 10),
    ("euler", dict(beta_schedule="squaredcos_cap_v2"), 10),
    ("dpm_solver_pp_2m", dict(beta_schedule="squaredcos_cap_v2"), 10),
    ("lms", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 25),
    # alpha / clipping / thresholding
    ("ddim", dict(set_alpha_to_one=True), 10),
    ("ddim", dict(clip_sample=True, clip_sample_range=0.5), 10),
    ("ddim", dict(clip_sample=True, use_clipped_model_output=True), 10),
    ("ddim", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), 10),
    ("ddpm", dict(clip_sample=True), 25),
    ("ddpm", dict(variance_type="fixed_large"), 10),
    ("ddpm", dict(variance_type="fixed_small_log"), 10),
    ("pndm", dict(set_alpha_to_one=True), 10),
    ("heun", dict(clip_sample=True, clip_sample_range=0.8), 10),
    # zero-terminal-SNR (v-prediction, trailing: the recipe of the paper)
    ("ddim", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 25),
    ("ddpm", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 10),
    # In sigma space zero-SNR makes sigma_max = 4096 and the first Euler step computes a ~18-sized result
    # as the difference of ~4096-sized terms: float32 rounding of sigma_max (torch's CPU sqrt is not
    # always correctly rounded) is amplified ~200x in both implementations, hence the looser tolerance.
    ("euler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 10, 1e-4),
    ("euler_ancestral", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                             timestep_spacing="trailing"), 10, 1e-4),
    ("dpm_solver_pp_2m", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                              timestep_spacing="trailing"), 10),
    # sigma schedules
    ("dpm_solver_pp_2m", dict(use_karras_sigmas=True), 10),
    ("dpm_solver_pp_2m", dict(use_karras_sigmas=True), 25),
    ("dpm_solver_pp_2m", dict(use_exponential_sigmas=True), 10),
    ("euler", dict(use_karras_sigmas=True), 25),
    ("euler", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), 10),
    ("euler", dict(use_exponential_sigmas=True), 10),
    ("euler", dict(final_sigmas_type="sigma_min"), 10),
    ("lms", dict(use_karras_sigmas=True), 25),
    ("heun", dict(use_karras_sigmas=True), 10),
    # DPM-Solver++ options
    ("dpm_solver_pp_2m", dict(solver_type="heun"), 25),
    ("dpm_solver_pp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=False), 25),
    ("dpm_solver_pp_2m", dict(final_sigmas_type="sigma_min", euler_at_final=True), 10),
    ("dpm_solver_pp_2m", dict(thresholding=True, prediction_type="sample"), 10),
    ("dpm_solver_pp_2m", dict(lambda_min_clipped=-5.0, beta_schedule="squaredcos_cap_v2"), 10),
    # PNDM with its Runge-Kutta warm-up
    ("pndm", dict(skip_prk_steps=False), 10),
    ("pndm", dict(skip_prk_steps=False, prediction_type="v_prediction"), 25),
]


def _case_id(c):
    return f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}-{c[2]}"


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[_case_id(c) for c in CONFIG_CASES])
def test_parity_config_options(case, monkeypatch):
    name, overrides, n = case[:3]
    tol = case[3] if len(case) > 3 else TOL
    compare(name, dict(BASE[name], **overrides), n, _case_id(case), monkeypatch=monkeypatch, tol=tol)


@pytest.mark.parametrize("n", [10, 50])
def test_parity_ddim_eta(n, monkeypatch):
    compare("ddim", BASE["ddim"], n, f"ddim-eta0.7-{n}", eta=0.7, monkeypatch=monkeypatch)


# ---------------------------------------------------------------------------------------- scan and API
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_scan_matches_python_loop(name):
    sched = get_scheduler(name, BASE[name], **({"eta": 0.5} if name == "ddim" else {}))
    noises = None
    if sched.stochastic:
        noises = step_noises(sched.num_model_calls(sched.set_timesteps(10, SHAPE)))
    loop = run_python_loop(sched, 10, noises)
    scan = run_scan(sched, 10, noises)
    for a, b in zip(scan["xs"], loop["xs"]):
        assert rel_err(a, b) <= 1e-6
    for a, b in zip(scan["x0s"], loop["x0s"]):
        assert rel_err(a, b) <= 1e-6


def test_model_call_counts_and_keys():
    pndm = get_scheduler("pndm", BASE["pndm"])
    assert pndm.num_model_calls(pndm.set_timesteps(20, SHAPE)) == 21
    assert get_scheduler("pndm", skip_prk_steps=False).set_timesteps(20, SHAPE).timesteps.shape == (29,)
    heun = get_scheduler("heun", SD)
    assert heun.num_model_calls(heun.set_timesteps(20, SHAPE)) == 39
    # a stochastic scheduler draws its noise from `key`, and refuses to run without key or noise
    ea = get_scheduler("euler_ancestral", SD)
    st = ea.set_timesteps(5, SHAPE)
    x = jnp.ones(SHAPE)
    _, a, _ = ea.step(st, x, 0, x, key=jax.random.key(0))
    _, b, _ = ea.step(st, x, 0, x, key=jax.random.key(1))
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="key"):
        ea.step(st, x, 0, x)
    # a deterministic one ignores key and noise
    eu = get_scheduler("euler", SD)
    st = eu.set_timesteps(5, SHAPE)
    np.testing.assert_array_equal(eu.step(st, x, 0, x)[1], eu.step(st, x, 0, x, key=jax.random.key(3))[1])


@pytest.mark.parametrize("name", ["ddpm", "euler", "dpm_solver_pp_2m"])
def test_add_noise_velocity_noise_level(name):
    ours = get_scheduler(name, SD)
    ref = getattr(diffusers, DIFFUSERS[name]).from_config(SD)
    ref.set_timesteps(10)
    state = ours.set_timesteps(10, SHAPE)
    x0 = init_noise(3)
    eps = init_noise(4)
    ts = np.asarray(state.timesteps)[[0, 3]]
    got = ours.add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(ts))
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(ts))
    assert rel_err(got, want) <= 1e-6
    # the schedule's own noise level at each step, and add_noise_at_step agrees with add_noise
    for k in (0, 3):
        lvl = float(ours.sigma_or_noise_level(state, k))
        if ours.sigma_space:
            assert lvl == pytest.approx(float(ref.sigmas[k]), rel=1e-6)
        else:
            a = float(ref.alphas_cumprod[int(state.timesteps[k])])
            assert lvl == pytest.approx((1 - a) ** 0.5, rel=1e-6)
    at = ours.add_noise_at_step(state, jnp.asarray(x0), jnp.asarray(eps), 3)
    assert rel_err(at[1], got[1]) <= 1e-5
    # v-prediction target (integer training timesteps), diffusers' DDPM get_velocity
    tt = np.array([10, 900])
    v = ours.get_velocity(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(tt))
    ddpm = diffusers.DDPMScheduler.from_config(SD)
    want_v = ddpm.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(tt))
    assert rel_err(v, want_v) <= 1e-6
    np.testing.assert_array_equal(ours.alphas_cumprod, ddpm.alphas_cumprod.numpy())


def test_training_schedules_bitwise():
    for cfg in (
        SD,
        dict(beta_schedule="linear"),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(SD, rescale_betas_zero_snr=True),
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=777),
    ):
        ours = get_scheduler("ddim", cfg)
        ref = diffusers.DDIMScheduler.from_config(cfg)
        if cfg.get("rescale_betas_zero_snr"):
            # 1 - alpha_bar[t] / alpha_bar[t-1] cancels: an ulp of torch's CPU sqrt (not always
            # correctly rounded) shows in the betas; alpha_bar agrees to a few 1e-6
            np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-12)
            continue
        np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


# ---------------------------------------------------------------------------------------- configs
def test_names_class_names_and_swapping():
    assert set(SCHEDULERS) == set(DIFFUSERS)
    for name, cls_name in DIFFUSERS.items():
        a = get_scheduler(name)
        b = get_scheduler({"_class_name": cls_name, "_diffusers_version": "0.30.0"})
        assert a.name == b.name == name
        assert b.config["_class_name"] == cls_name and b.config["_diffusers_version"] == "0.30.0"
    # an SD 1.x folder config; swap the method reusing its training schedule
    sd_cfg = {
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False,
    }
    pndm = get_scheduler(sd_cfg)
    assert pndm.name == "pndm" and pndm.config.skip_prk_steps and pndm.config["steps_offset"] == 1
    euler = get_scheduler("euler", base_config=pndm.config)
    assert euler.config["beta_schedule"] == "scaled_linear" and euler.config["steps_offset"] == 1
    np.testing.assert_array_equal(euler.alphas_cumprod, pndm.alphas_cumprod)
    ddim = get_scheduler("DDIMScheduler", base_config=sd_cfg, eta=0.3)
    assert ddim.config["clip_sample"] is False and ddim.config["set_alpha_to_one"] is False and ddim.stochastic
    karras = get_scheduler("dpm_solver_pp_2m_karras", base_config=sd_cfg)
    assert karras.config["use_karras_sigmas"] is True
    assert get_scheduler(karras) is karras
    # the same swap in diffusers gives the same timesteps
    ref = diffusers.EulerDiscreteScheduler.from_config(diffusers.PNDMScheduler.from_config(sd_cfg).config)
    ref.set_timesteps(30)
    np.testing.assert_array_equal(np.asarray(euler.set_timesteps(30, SHAPE).timesteps), ref.timesteps.numpy())


@pytest.mark.parametrize(
    "name,cfg,match",
    [
        ("ddim", dict(beta_schedule="sigmoid"), "beta_schedule.*'linear', 'scaled_linear', 'squaredcos_cap_v2'"),
        ("euler", dict(prediction_type="flow"), "prediction_type.*'epsilon'"),
        ("ddpm", dict(timestep_spacing="karras"), "timestep_spacing.*'leading'"),
        ("pndm", dict(prediction_type="sample"), "prediction_type.*'epsilon', 'v_prediction'"),
        ("ddpm", dict(variance_type="learned_range"), "variance_type.*'fixed_small'"),
        ("euler", dict(use_beta_sigmas=True), "use_beta_sigmas.*False"),
        ("euler", dict(interpolation_type="log_linear"), "interpolation_type"),
        ("dpm_solver_pp_2m", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type.*'dpmsolver\\+\\+'"),
        ("dpm_solver_pp_2m", dict(solver_order=3), "solver_order.*2"),
        ("dpm_solver_pp_2m", dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one of"),
        ("ddim", dict(clip_sample="yes"), "clip_sample"),
        ("ddim", dict(num_train_timesteps=0), "num_train_timesteps"),
        ("ddim", dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    ],
)
def test_bad_config_values(name, cfg, match):
    with pytest.raises(ConfigError, match=match):
        get_scheduler(name, **cfg)
    assert issubclass(ConfigError, ValueError)


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown scheduler 'dpm3'.*ddim"):
        get_scheduler("dpm3")
    with pytest.raises(ConfigError, match="_class_name.*UniPCMultistepScheduler"):
        get_scheduler({"_class_name": "UniPCMultistepScheduler"})
    with pytest.raises(ConfigError, match="_class_name"):
        get_scheduler({"beta_schedule": "linear"})
    # load_scheduler: a pipeline folder, a missing file, a bad file
    (tmp_path / "scheduler").mkdir()
    cfg = {"_class_name": "EulerDiscreteScheduler", **SD, "timestep_spacing": "leading", "steps_offset": 1}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    s = load_scheduler(tmp_path)
    assert s.name == "euler" and s.config["steps_offset"] == 1
    with pytest.raises(SdjaxError, match="scheduler_config.json"):
        load_scheduler(tmp_path / "empty_missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdjaxError, match="scheduler_config.json"):
        load_scheduler(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="scheduler_config.json"):
        load_scheduler(tmp_path, subfolder="bad")
    (tmp_path / "bad" / "scheduler_config.json").write_text(json.dumps(dict(cfg, beta_schedule="cosine")))
    with pytest.raises(ConfigError, match="scheduler_config.json.*beta_schedule"):
        load_scheduler(tmp_path, subfolder="bad")


def test_no_torch_or_scipy_at_runtime():
    import subprocess
    import sys

    code = (
        "import sys, sdjax.schedulers as s; st = s.get_scheduler('lms').set_timesteps(10, (1, 4, 8, 8)); "
        "bad = [m for m in ('torch', 'scipy', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
