"""Samplers: small pure functions over a denoiser and a precomputed schedule.

Each sampler reproduces a diffusers scheduler built from a model family's `SchedulerConfig` (train
timesteps, scaled_linear beta range, steps_offset, prediction type; SD 1.x: family.SD1.scheduler,
the values of SD 1.5's scheduler_config.json) with set_alpha_to_one False, clip_sample False, and
that class's default timestep spacing (or "leading" for all when the config says so, as SDXL's does):

    ddpm             DDPMScheduler                   leading spacing, fixed_small variance
    ddim             DDIMScheduler (eta 0)           leading spacing
    euler            EulerDiscreteScheduler          linspace spacing
    euler_a          EulerAncestralDiscreteScheduler linspace spacing
    dpmpp_2m         DPMSolverMultistepScheduler     dpmsolver++, order 2, linspace spacing
    dpmpp_2m_karras  same, use_karras_sigmas=True

Schedules are built with the same dtypes diffusers uses (float32 torch tables, numpy float64
interpolation, float32 sigmas), and the per-step coefficients are 0-d float32 CPU tensors combined
in the same order as diffusers, so the results agree to float32 rounding (bitwise on CPU).

Conventions (k-diffusion style, no hidden state):
- `x` passed to `sample` is already at the noise level of step `start`: for txt2img
  `noise * schedule.init_noise_sigma`, for img2img `add_noise(schedule, x0, noise, start)`.
- `eps_model(model_input [B,4,h,w], t: float) -> model output [B,4,h,w]`: the noise (prediction
  type "epsilon") or the velocity v = sqrt(abar) * eps - sqrt(1-abar) * x0 ("v_prediction", SD 2.x
  768-v), as `schedule.prediction_type` says; each sampler turns it into its x0 (and eps) with
  diffusers' formula for that type, in diffusers' order of operations. model_input is scaled as
  diffusers' `scale_model_input` does (divided by sqrt(sigma^2+1) for the Euler samplers).
- Stochastic samplers draw the noise of row i from `generators[i]` as
  torch.randn((1,4,h,w), float32) on CPU, one draw per step, like diffusers at batch 1.
- All sampler math is float32 on x's device; the result is float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from batchsd.errors import InputError
from batchsd.model.request import img2img_steps
from batchsd.model.sampler_names import SAMPLERS, resolve_sampler

STOCHASTIC = ("ddpm", "euler_a")  # samplers that draw fresh noise at every step
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the denoiser outputs (diffusers' prediction_type)
# SchedulerConfig.timestep_spacing values (diffusers' names, Table 2 of arXiv 2305.08891); None: each
# sampler's diffusers class default, DEFAULT_SPACING
TIMESTEP_SPACINGS = (None, "leading", "linspace", "trailing")
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "euler": "linspace", "euler_a": "linspace",
                   "dpmpp_2m": "linspace", "dpmpp_2m_karras": "linspace"}

EpsModel = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler_config.json values the samplers depend on (a model family's, family.py)."""

    num_train_timesteps: int      # the training schedule's length; timesteps are 0..num_train_timesteps-1
    beta_start: float             # scaled_linear betas: linspace(sqrt(beta_start), sqrt(beta_end))**2
    beta_end: float
    steps_offset: int             # added to the "leading" timesteps (DDPM, DDIM)
    prediction_type: str = "epsilon"  # PREDICTION_TYPES: what the UNet outputs
    # None: each sampler's class default (DEFAULT_SPACING); a value: every sampler's (SDXL's config says
    # "leading"; a diffusers folder's scheduler config may say any of TIMESTEP_SPACINGS)
    timestep_spacing: str | None = None

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"beta_start {self.beta_start} and beta_end {self.beta_end} must satisfy "
                             "0 < beta_start < beta_end < 1 (SD's are 0.00085 and 0.012)")
        if self.num_train_timesteps < 2 or self.steps_offset < 0:
            raise ValueError(f"num_train_timesteps {self.num_train_timesteps} must be >= 2 and steps_offset "
                             f"{self.steps_offset} >= 0 (SD's are 1000 and 1)")


@dataclass(frozen=True, eq=False)
class Schedule:
    """Everything a sampler needs for one (sampler, steps) pair; n = number of steps."""

    sampler: str                  # canonical name
    timesteps: torch.Tensor       # [n] UNet timestep of each step (int64; float32 for euler, euler_a)
    sigmas: torch.Tensor          # [n+1] float32 sigma = sqrt((1-abar)/abar) at each step, then the end level
    alphas_cumprod: torch.Tensor  # [n+1] float32 abar at each step, then the end level
    init_noise_sigma: float       # txt2img: x = noise * init_noise_sigma
    prediction_type: str = "epsilon"  # what the denoiser outputs (SchedulerConfig.prediction_type)
    # DDIM only: [n] float32 abar each step goes to, at t - train_steps // n (diffusers' prev_timestep;
    # the end level below 0). The next step's abar for "leading" spacing, not for the others
    prev_alphas_cumprod: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def train_alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """[num_train_timesteps] float32 abar of the scaled_linear schedule, computed as diffusers does."""
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps,
                           dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    # diffusers' piecewise-linear inverse of log sigma(t) over the train timesteps
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def make_schedule(sampler: str, steps: int, config: SchedulerConfig) -> Schedule:
    """The schedule diffusers' `set_timesteps(steps)` produces for this sampler and config (pure)."""
    name = resolve_sampler(sampler)
    train_steps = config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps < train_steps:
        raise InputError(f"steps must be an integer in 1..{train_steps - 1}, got {steps!r}")
    steps = int(steps)
    acp = train_alphas_cumprod(config)  # [train_steps] float32
    train_sigmas = (((1 - acp) / acp) ** 0.5).numpy()  # [train_steps] float32

    spacing = config.timestep_spacing or DEFAULT_SPACING[name]
    if name in ("ddpm", "ddim"):
        timesteps = _spaced(spacing, steps, train_steps, config.steps_offset, np.int64)
        # the abar of the step after the last: DDPM uses 1 (t = -1), DDIM final_alpha_cumprod = abar[0]
        end = torch.tensor(1.0) if name == "ddpm" else acp[0]
        ts = torch.from_numpy(timesteps)
        alphas_cumprod = torch.cat([acp[ts], end.reshape(1)])
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        prev = None
        if name == "ddim":
            prev_t = ts - train_steps // steps
            prev = torch.where(prev_t >= 0, acp[prev_t.clamp(min=0)], acp[0])
        return Schedule(name, ts, sigmas, alphas_cumprod, 1.0, config.prediction_type, prev)

    if name in ("euler", "euler_a"):
        # float32 timesteps, sigmas interpolated in float64
        timesteps = _spaced(spacing, steps, train_steps, config.steps_offset, np.float32)
        sig = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        # diffusers: the largest sigma for "linspace" and "trailing", sqrt(sigma_max^2 + 1) for "leading"
        leading = spacing == "leading"
        init_noise_sigma = float((sigmas.max() ** 2 + 1) ** 0.5) if leading else float(sigmas.max())
        ts = torch.from_numpy(timesteps.astype(np.float32))
    else:  # dpmpp_2m, dpmpp_2m_karras: integer timesteps, n+1 points with the last dropped but for "trailing"
        timesteps = _spaced(spacing, steps, train_steps, config.steps_offset, np.int64, multistep=True)
        if name == "dpmpp_2m_karras":
            sigma_max, sigma_min = train_sigmas[-1].item(), train_sigmas[0].item()
            ramp = np.linspace(0, 1, steps)
            min_inv_rho, max_inv_rho = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
            sig = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** 7.0
            log_sigmas = np.log(train_sigmas)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sig]).round()
        else:
            sig = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sig, [0]]).astype(np.float32))
        init_noise_sigma = 1.0
        ts = torch.from_numpy(timesteps).to(torch.int64)
    alphas_cumprod = 1 / (sigmas**2 + 1)
    return Schedule(name, ts, sigmas, alphas_cumprod, init_noise_sigma, config.prediction_type)


def _spaced(spacing: str, steps: int, train_steps: int, steps_offset: int, dtype, multistep: bool = False):
    """The n timesteps of diffusers' set_timesteps for `spacing`, highest first, as its classes write
    them (`multistep`: DPMSolverMultistep's n+1-point "linspace"/"leading" with the last point dropped)."""
    points = steps + 1 if multistep else steps
    if spacing == "linspace":
        if dtype == np.float32:   # Euler's: float32 linspace, not rounded
            return np.linspace(0, train_steps - 1, points, dtype=np.float32)[::-1].copy()
        timesteps = np.linspace(0, train_steps - 1, points).round()[::-1]
    elif spacing == "leading":
        timesteps = (np.arange(0, points) * (train_steps // points)).round()[::-1]
    else:  # "trailing": n points from the top down, then -1
        return np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(dtype) - 1
    if multistep:
        timesteps = timesteps[:-1]
    timesteps = timesteps.copy().astype(dtype)
    return timesteps + (steps_offset if spacing == "leading" else 0)


def img2img_start(steps: int, strength: float) -> int:
    """First step index of an img2img run (diffusers' get_timesteps): steps - img2img_steps(steps, strength)."""
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be in [0, 1], got {strength}")
    run = img2img_steps(steps, strength)
    if run < 1:
        raise InputError(
            f"strength {strength} with {steps} steps leaves no denoising step (int(steps*strength) = 0); "
            "raise strength or steps"
        )
    return steps - run


def add_noise(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, start: int) -> torch.Tensor:
    """Clean latents noised to the level of step `start` (diffusers' scheduler.add_noise)."""
    _check_start(schedule, start)
    x0, noise = x0.float(), noise.to(device=x0.device, dtype=torch.float32)
    if schedule.sampler in ("ddpm", "ddim"):
        abar = schedule.alphas_cumprod[start]
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
    sigma = schedule.sigmas[start]
    if schedule.sampler in ("euler", "euler_a"):
        return x0 + noise * sigma
    alpha_t, sigma_t = _alpha_sigma(sigma)  # DPM works in the variance-preserving parametrisation
    return alpha_t * x0 + sigma_t * noise


def sample(
    sampler: str,
    eps_model: EpsModel,
    x: torch.Tensor,
    schedule: Schedule,
    generators: Sequence[torch.Generator] | None,
    start: int = 0,
) -> torch.Tensor:
    """Run steps start..n-1 from x (already at the noise level of step `start`); returns float32."""
    name = resolve_sampler(sampler)
    if name != schedule.sampler:
        raise ValueError(f"schedule was made for {schedule.sampler!r}, not {name!r}")
    _check_start(schedule, start)
    noise = None
    if name in STOCHASTIC:
        if generators is None or len(generators) != x.shape[0]:
            n = "none" if generators is None else len(generators)
            raise ValueError(f"{name} needs one generator per row: {x.shape[0]} rows, {n} generators")
        noise = lambda: _row_noise(generators, x)  # noqa: E731
    return SAMPLE_FNS[name](eps_model, x.float(), schedule, noise, start)


def _check_start(schedule: Schedule, start: int) -> None:
    if not 0 <= start < schedule.num_steps:
        raise ValueError(f"start must be in 0..{schedule.num_steps - 1}, got {start}")


def _row_noise(generators: Sequence[torch.Generator], x: torch.Tensor) -> torch.Tensor:
    # [B,4,h,w]: row i from generators[i], drawn on CPU in float32 (diffusers' randn_tensor)
    shape = (1,) + tuple(x.shape[1:])
    rows = [torch.randn(shape, generator=g, device="cpu", dtype=torch.float32) for g in generators]
    return torch.cat(rows, dim=0).to(x.device)


def _eps(eps_model: EpsModel, model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return eps_model(model_input, float(t)).float()


def _discrete_x0_eps(out, x, abar_t, beta_prod_t, prediction_type):
    """(x0, eps) from the model output at abar_t (DDPM/DDIM step)."""
    if prediction_type == "v_prediction":
        x0 = (abar_t**0.5) * x - (beta_prod_t**0.5) * out
        return x0, (abar_t**0.5) * out + (beta_prod_t**0.5) * x
    return (x - beta_prod_t ** (0.5) * out) / abar_t ** (0.5), out


def _k_denoised(out, x, sigma, prediction_type):
    """x0 from the model output at sigma (Euler samplers; x is the unscaled sample)."""
    if prediction_type == "v_prediction":  # c_out * v + c_skip * x
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    return x - sigma * out


# ---------------------------------------------------------------------------------------------
# DDPM / DDIM: discrete-time updates on abar (scalars are 0-d float32 tensors, as in diffusers)


def sample_ddpm(eps_model, x, schedule, noise, start=0):
    """Ancestral DDPM (fixed_small variance): x_{t-1} ~ q(x_{t-1} | x_t, x0_pred)."""
    for i in range(start, schedule.num_steps):
        t = schedule.timesteps[i]
        out = _eps(eps_model, x, t)
        abar_t, abar_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod[i + 1]
        beta_prod_t, beta_prod_prev = 1 - abar_t, 1 - abar_prev
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        x0, _ = _discrete_x0_eps(out, x, abar_t, beta_prod_t, schedule.prediction_type)
        x0_coeff = (abar_prev ** (0.5) * beta_t) / beta_prod_t
        x_coeff = alpha_t ** (0.5) * beta_prod_prev / beta_prod_t
        x_mean = x0_coeff * x0 + x_coeff * x
        if t > 0:  # diffusers draws noise at every step with t > 0 (always, with steps_offset 1)
            variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), min=1e-20)
            x_mean = x_mean + (variance**0.5) * noise()
        x = x_mean
    return x


def sample_ddim(eps_model, x, schedule, noise=None, start=0):
    """Deterministic DDIM (eta 0)."""
    for i in range(start, schedule.num_steps):
        out = _eps(eps_model, x, schedule.timesteps[i])
        abar_t, abar_prev = schedule.alphas_cumprod[i], schedule.prev_alphas_cumprod[i]
        beta_prod_t = 1 - abar_t
        x0, eps = _discrete_x0_eps(out, x, abar_t, beta_prod_t, schedule.prediction_type)
        direction = (1 - abar_prev - 0.0) ** (0.5) * eps  # std_dev_t = eta * ... = 0
        x = abar_prev ** (0.5) * x0 + direction
    return x


# ---------------------------------------------------------------------------------------------
# Euler / Euler ancestral: the ODE/SDE in sigma (x = x0 + sigma * eps), input scaled by 1/sqrt(sigma^2+1)


def sample_euler(eps_model, x, schedule, noise=None, start=0):
    """Euler method on dx/dsigma = (x - x0_pred) / sigma."""
    sigmas = schedule.sigmas
    for i in range(start, schedule.num_steps):
        sigma = sigmas[i]
        out = _eps(eps_model, x / ((sigma**2 + 1) ** 0.5), schedule.timesteps[i])
        sigma_hat = sigma * (0.0 + 1)  # s_churn = 0: no extra noise
        denoised = _k_denoised(out, x, sigma_hat, schedule.prediction_type)
        d = (x - denoised) / sigma_hat
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


def sample_euler_a(eps_model, x, schedule, noise, start=0):
    """Ancestral Euler: Euler step down to sigma_down, then add fresh noise of size sigma_up."""
    sigmas = schedule.sigmas
    for i in range(start, schedule.num_steps):
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        out = _eps(eps_model, x / ((sigma_from**2 + 1) ** 0.5), schedule.timesteps[i])
        denoised = _k_denoised(out, x, sigma_from, schedule.prediction_type)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / sigma_from
        x = x + d * (sigma_down - sigma_from)
        x = x + noise() * sigma_up  # drawn at every step, also the last (sigma_up = 0)
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M): multistep in lambda = log(alpha/sigma) on the data prediction


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # VP alpha_t, sigma_t from the VE sigma
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _lambda(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(alpha) - torch.log(sigma)


def sample_dpmpp_2m(eps_model, x, schedule, noise=None, start=0):
    """DPM-Solver++ 2M (midpoint). The first step run (also at an img2img start) and the last step
    (final sigma 0) are first order, as in diffusers (lower_order_final, final_sigmas_type zero)."""
    sigmas, n = schedule.sigmas, schedule.num_steps
    prev_x0 = None  # data prediction of the previous step run
    for i in range(start, n):
        out = _eps(eps_model, x, schedule.timesteps[i])
        alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i])
        if schedule.prediction_type == "v_prediction":
            x0 = alpha_s0 * x - sigma_s0 * out
        else:
            x0 = (x - sigma_s0 * out) / alpha_s0
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
        h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s0, sigma_s0)
        if prev_x0 is None or i == n - 1:
            x = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_s1, sigma_s1 = _alpha_sigma(sigmas[i - 1])
            r0 = (_lambda(alpha_s0, sigma_s0) - _lambda(alpha_s1, sigma_s1)) / h
            d1 = (1.0 / r0) * (x0 - prev_x0)
            x = (
                (sigma_t / sigma_s0) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        prev_x0 = x0
    return x


SAMPLE_FNS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m,
}
assert set(SAMPLE_FNS) == set(SAMPLERS), "a sampler name without a sampler, or the reverse"
