"""Parity of batchsd.model.samplers with the diffusers schedulers (SD 1.5 config), txt2img and img2img."""

import dataclasses

import pytest
import torch

from batchsd.errors import InputError
from batchsd.model import samplers as S
from batchsd.model.family import SD1
from batchsd.model.sampler_names import SAMPLERS

diffusers = pytest.importorskip("diffusers")

# SD 1.5 scheduler_config.json values, given explicitly (from_config of an in-memory config would
# fall back to class defaults). Keys a class does not know are ignored by from_config.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    prediction_type="epsilon",
    trained_betas=None,
)
REFERENCE = {  # sampler -> (class, extra config, expected default timestep_spacing)
    "ddpm": ("DDPMScheduler", {}, "leading"),
    "ddim": ("DDIMScheduler", {}, "leading"),
    "euler": ("EulerDiscreteScheduler", {}, "linspace"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "linspace"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), "linspace"),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
        "linspace",
    ),
}
STEPS = [1, 2, 4, 10, 25]
SEEDS = [0, 1, 1234]
STRENGTHS = [0.3, 0.5, 0.75, 1.0]
LATENT = (1, 4, 8, 6)
TOL = 1e-5  # max |ours - diffusers| / max |diffusers|


def make_reference(name, **overrides):
    cls_name, extra, spacing = REFERENCE[name]
    sched = getattr(diffusers, cls_name).from_config({**SD15_SCHEDULER, **extra, **overrides})
    if "timestep_spacing" not in overrides:
        assert sched.config.timestep_spacing == spacing  # the class default we claim to reproduce
    return sched


PATTERN = torch.linspace(-1, 1, LATENT[1] * LATENT[2] * LATENT[3]).reshape(LATENT[1:])


def fake_eps(x, t):
    """Cheap deterministic nonlinear stand-in for the UNet (t: float or diffusers' 0-d tensor)."""
    tt = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    pattern = PATTERN.to(x.device)
    return torch.tanh(0.5 * x + torch.sin(tt / 100) + 0.3 * pattern) * 0.9 + 0.1 * x * torch.cos(tt / 300)


def recording(model, seen):
    def wrapped(x, t):
        seen.append(float(t))
        return model(x, t)

    return wrapped


def reference_run(name, steps, seed, init, x0=None, strength=1.0, **overrides):
    """The diffusers loop at batch 1. txt2img: init is the noise; img2img: the noise is drawn from
    the row's generator first (as the img2img pipeline does), then the same generator steps."""
    sched = make_reference(name, **overrides)
    sched.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    timesteps = sched.timesteps
    if x0 is None:
        latents = init * sched.init_noise_sigma
    else:
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = sched.timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32)
        latents = sched.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    seen = []
    for t in timesteps:
        inp = sched.scale_model_input(latents, t)
        eps = recording(fake_eps, seen)(inp, t)
        latents = sched.step(eps, t, latents, generator=g).prev_sample
    return latents, seen


def ours_run(name, steps, seeds, init, x0=None, strength=1.0, config=SD1.scheduler):
    schedule = S.make_schedule(name, steps, config)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if x0 is None:
        start, x = 0, init * schedule.init_noise_sigma
    else:
        start = S.img2img_start(steps, strength)
        noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g, dtype=torch.float32) for g in gens])
        x = S.add_noise(schedule, x0, noise, start)
    seen = []
    out = S.sample(name, recording(fake_eps, seen), x, schedule, gens, start=start)
    return out, seen


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def latents_for(seed, scale=1.0):
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(10_000 + seed)) * scale


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_schedule_matches_diffusers(name, steps):
    ref = make_reference(name)
    ref.set_timesteps(steps)
    ours = S.make_schedule(name, steps, SD1.scheduler)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.init_noise_sigma == float(ref.init_noise_sigma)
    if name in ("ddpm", "ddim"):
        assert torch.equal(ours.alphas_cumprod[:-1], ref.alphas_cumprod[ref.timesteps])
    else:
        assert ours.sigmas.dtype == torch.float32
        assert torch.equal(ours.sigmas, ref.sigmas)
    assert ours.sigmas.shape == ours.alphas_cumprod.shape == (steps + 1,)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_txt2img_matches_diffusers(name, steps):
    worst = 0.0
    for seed in SEEDS:
        init = latents_for(seed)
        ref, ref_seen = reference_run(name, steps, seed, init)
        out, seen = ours_run(name, steps, [seed], init)
        assert seen == ref_seen  # same UNet timesteps, exactly
        assert torch.isfinite(out).all()
        worst = max(worst, rel_err(out, ref))
    assert worst < TOL, f"{name} steps={steps}: rel err {worst:.2e}"


@pytest.mark.parametrize("steps", [2, 4, 10, 25])
@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_matches_diffusers(name, steps):
    worst = 0.0
    for strength in STRENGTHS:
        if int(steps * strength) == 0:
            with pytest.raises(InputError):
                S.img2img_start(steps, strength)
            continue
        for seed in SEEDS[:2]:
            x0 = latents_for(seed, scale=0.8)
            ref, ref_seen = reference_run(name, steps, seed, None, x0=x0, strength=strength)
            out, seen = ours_run(name, steps, [seed], None, x0=x0, strength=strength)
            assert seen == ref_seen
            assert len(seen) == int(steps * strength)
            worst = max(worst, rel_err(out, ref))
    assert worst < TOL, f"{name} steps={steps}: rel err {worst:.2e}"


@pytest.mark.parametrize("name", SAMPLERS)
def test_batch_rows_equal_single_rows(name):
    """Each row of a batch with per-row generators equals that row run alone in diffusers."""
    seeds, steps = [7, 8, 9], 10
    init = torch.cat([latents_for(s) for s in seeds])
    out, _ = ours_run(name, steps, seeds, init)
    for i, seed in enumerate(seeds):
        ref, _ = reference_run(name, steps, seed, init[i : i + 1])
        assert rel_err(out[i : i + 1], ref) < TOL
    x0 = torch.cat([latents_for(s, 0.8) for s in seeds])
    out, _ = ours_run(name, steps, seeds, None, x0=x0, strength=0.6)
    for i, seed in enumerate(seeds):
        ref, _ = reference_run(name, steps, seed, None, x0=x0[i : i + 1], strength=0.6)
        assert rel_err(out[i : i + 1], ref) < TOL


SPACING_STEPS = [1, 3, 4, 7, 10]   # 3 and 7 do not divide 1000: "trailing" and DDIM's prev_timestep differ


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_timestep_spacing_matches_diffusers(name, spacing):
    """A diffusers folder's scheduler config may set timestep_spacing (SDXL: leading; few-step
    models: trailing): the schedule, txt2img and img2img equal the class with that spacing."""
    config = dataclasses.replace(SD1.scheduler, timestep_spacing=spacing)
    for steps in SPACING_STEPS:
        ref = make_reference(name, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        ours = S.make_schedule(name, steps, config)
        assert torch.equal(ours.timesteps, ref.timesteps), (steps, ours.timesteps, ref.timesteps)
        assert ours.init_noise_sigma == float(ref.init_noise_sigma)
        if name not in ("ddpm", "ddim"):
            assert torch.equal(ours.sigmas, ref.sigmas)
        init = latents_for(steps)
        out, seen = ours_run(name, steps, [steps], init, config=config)
        ref_out, ref_seen = reference_run(name, steps, steps, init, timestep_spacing=spacing)
        assert seen == ref_seen and rel_err(out, ref_out) < TOL, (steps, rel_err(out, ref_out))
        if steps >= 3:
            x0 = latents_for(steps, scale=0.8)
            out, seen = ours_run(name, steps, [steps], None, x0=x0, strength=0.7, config=config)
            ref_out, ref_seen = reference_run(name, steps, steps, None, x0=x0, strength=0.7, timestep_spacing=spacing)
            assert seen == ref_seen and rel_err(out, ref_out) < TOL, (steps, rel_err(out, ref_out))


def test_ddim_steps_to_t_minus_the_step_ratio_not_to_the_next_timestep():
    """Negative control for the test above: with "linspace" spacing DDIM's next abar is not the next
    step's (diffusers' prev_timestep = t - 1000 // n); using the next step's is far outside TOL."""
    config = dataclasses.replace(SD1.scheduler, timestep_spacing="linspace")
    schedule = S.make_schedule("ddim", 7, config)
    assert not torch.equal(schedule.prev_alphas_cumprod, schedule.alphas_cumprod[1:])
    wrong = dataclasses.replace(schedule, prev_alphas_cumprod=schedule.alphas_cumprod[1:])
    init = latents_for(7)
    ref, _ = reference_run("ddim", 7, 7, init, timestep_spacing="linspace")
    assert rel_err(S.sample("ddim", fake_eps, init.clone(), wrong, None), ref) > 1e-3
    leading = S.make_schedule("ddim", 7, SD1.scheduler)
    assert torch.equal(leading.prev_alphas_cumprod[:-1], leading.alphas_cumprod[1:-1])   # the same for "leading"


def test_tolerance_catches_wrong_spacing_and_noise():
    """Negative controls: a plausible bug (other spacing, other seed) is far outside TOL."""
    init = latents_for(0)
    ref, _ = reference_run("euler", 10, 0, init, timestep_spacing="leading")
    out, _ = ours_run("euler", 10, [0], init)
    assert rel_err(out, ref) > 1e-3
    for name in S.STOCHASTIC:
        a, _ = ours_run(name, 10, [0], init)
        b, _ = ours_run(name, 10, [1], init)
        assert rel_err(a, b) > 1e-3


def test_sd1_scheduler_config_is_sd15s():
    """The SD 1.x family's scheduler values are those of SD 1.5's scheduler_config.json (above)."""
    config = SD1.scheduler
    assert (config.num_train_timesteps, config.beta_start, config.beta_end, config.steps_offset) == (
        SD15_SCHEDULER["num_train_timesteps"], SD15_SCHEDULER["beta_start"], SD15_SCHEDULER["beta_end"],
        SD15_SCHEDULER["steps_offset"])


def test_schedule_is_frozen_and_pure():
    a, b = S.make_schedule("Euler a", 10, SD1.scheduler), S.make_schedule("euler_a", 10, SD1.scheduler)
    assert a.sampler == "euler_a" and torch.equal(a.sigmas, b.sigmas) and torch.equal(a.timesteps, b.timesteps)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.init_noise_sigma = 1.0
    for bad in (0, -1, 1000, 2.5):
        with pytest.raises(ValueError):
            S.make_schedule("ddim", bad, SD1.scheduler)


def test_sample_argument_checks():
    sched = S.make_schedule("euler_a", 4, SD1.scheduler)
    x = torch.zeros(2, *LATENT[1:])
    with pytest.raises(ValueError, match="generator"):
        S.sample("euler_a", fake_eps, x, sched, [torch.Generator()])
    with pytest.raises(ValueError, match="schedule"):
        S.sample("euler", fake_eps, x, sched, None)
    with pytest.raises(ValueError, match="start"):
        S.sample("euler_a", fake_eps, x, sched, [torch.Generator()] * 2, start=4)
    # deterministic samplers need no generators
    S.sample("ddim", fake_eps, x, S.make_schedule("ddim", 2, SD1.scheduler), None)


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_img2img_start_matches_diffusers_get_timesteps(steps):
    for strength in [0.05, 0.1, 0.3, 0.5, 0.7, 0.75, 0.99, 1.0]:
        init_timestep = min(int(steps * strength), steps)
        if init_timestep == 0:
            with pytest.raises(InputError):
                S.img2img_start(steps, strength)
        else:
            assert S.img2img_start(steps, strength) == max(steps - init_timestep, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SAMPLERS)
def test_cuda_matches_cpu(name):
    """Latents on CUDA (schedule scalars stay 0-d CPU tensors, noise drawn on CPU) match CPU."""
    seeds, steps = [3, 4], 10
    init = torch.cat([latents_for(s) for s in seeds])
    schedule = S.make_schedule(name, steps, SD1.scheduler)
    outs = []
    for device in ("cpu", "cuda"):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        x = (init * schedule.init_noise_sigma).to(device)
        outs.append(S.sample(name, fake_eps, x, schedule, gens).cpu())
    assert rel_err(outs[1], outs[0]) < 1e-4



@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_v_prediction_matches_diffusers(name, steps):
    """prediction_type "v_prediction" (SD 2.x 768-v): the denoiser's output read as diffusers' schedulers
    read it, txt2img and img2img."""
    config = dataclasses.replace(SD1.scheduler, prediction_type="v_prediction")
    init = latents_for(7)
    ref, ref_seen = reference_run(name, steps, 7, init, prediction_type="v_prediction")
    out, seen = ours_run(name, steps, [7], init, config=config)
    assert seen == ref_seen and rel_err(out, ref) <= TOL
    if steps > 1:  # (one step from the top noise level lands near the same x0 either way)
        eps_out, _ = ours_run(name, steps, [7], init)
        assert rel_err(eps_out, ref) > 100 * TOL        # the prediction type matters
    x0 = latents_for(8, scale=0.5)
    ref, _ = reference_run(name, steps, 8, None, x0=x0, strength=0.75, prediction_type="v_prediction")
    if steps * 0.75 >= 1:
        out, _ = ours_run(name, steps, [8], None, x0=x0, strength=0.75, config=config)
        assert rel_err(out, ref) <= TOL


def test_prediction_type_is_checked():
    with pytest.raises(ValueError, match="prediction_type"):
        dataclasses.replace(SD1.scheduler, prediction_type="sample")
