"""Sampler names: the canonical names, the A1111 display names and every other accepted spelling,
in one table.

A name is compared case-insensitively with whitespace folded ("Euler a", "euler  A", " Euler_A ").
Accepted: a canonical name; its A1111 display name (`A1111_NAMES`, also what the PNG `parameters`
chunk shows); and the names other tools give the same sampler (`OTHER_NAMES`): k-diffusion's
function names and A1111's aliases (`k_euler`, `k_euler_a`, `k_euler_ancestral`, `k_dpmpp_2m`,
`k_dpmpp_2m_ka`, `sample_euler`, ...), DiffusionDB's (`k_euler`, `k_euler_ancestral`, `ddim`) and
diffusers' scheduler classes. A name of a sampler batchsd does not have (`k_lms`, `k_heun`, `plms`,
`DPM++ SDE`, ...) is refused, naming the nearest names batchsd has (difflib). Imports neither torch
nor numpy (the manifest validator uses it).
"""
from __future__ import annotations

import difflib

from batchsd.errors import InputError

# canonical name -> the name A1111 (and the PNG `parameters` chunk) shows
A1111_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}
SAMPLERS = tuple(A1111_NAMES)   # canonical names

# canonical name -> other tools' names for the same sampler (k-diffusion function names and A1111's
# aliases in modules/sd_samplers_kdiffusion.py; DiffusionDB's `sampler` strings; diffusers classes
# at their defaults: DPMSolverMultistepScheduler is 2nd-order DPM-Solver++ without Karras sigmas)
OTHER_NAMES = {
    "ddpm": ("DDPMScheduler",),
    "ddim": ("k_ddim", "DDIMScheduler"),
    "euler": ("k_euler", "sample_euler", "EulerDiscreteScheduler"),
    "euler_a": ("k_euler_a", "k_euler_ancestral", "euler_ancestral", "sample_euler_ancestral",
                "EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": ("k_dpmpp_2m", "sample_dpmpp_2m", "DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": ("k_dpmpp_2m_ka", "k_dpmpp_2m_karras", "dpmpp_2m_ka"),
}

# samplers other tools have and batchsd does not: named as such when refused
NOT_HERE = ("plms", "PLMS", "k_lms", "LMS", "lms", "k_heun", "Heun", "heun", "k_dpm_2", "DPM2", "dpm_2",
            "k_dpm_2_a", "k_dpm_2_ancestral", "DPM2 a", "dpm_2_ancestral", "k_dpmpp_2s_a", "DPM++ 2S a",
            "k_dpmpp_sde", "DPM++ SDE", "k_dpmpp_2m_sde", "DPM++ 2M SDE", "k_dpm_fast", "DPM fast",
            "k_dpm_ad", "DPM adaptive", "k_lms_ka", "LMS Karras", "DPM2 Karras", "DPM2 a Karras",
            "DPM++ 2S a Karras", "DPM++ SDE Karras", "DPM++ 2M SDE Karras", "UniPC", "unipc", "LCM", "lcm")


def _fold(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


_ALIASES = {**{_fold(other): canonical for canonical, others in OTHER_NAMES.items() for other in others},
            **{_fold(display): canonical for canonical, display in A1111_NAMES.items()},
            **{canonical: canonical for canonical in SAMPLERS}}
_NOT_HERE = {_fold(name) for name in NOT_HERE}


def resolve_sampler(name: str) -> str:
    """Canonical sampler name from any accepted spelling (case-insensitive); InputError (a
    ValueError) naming the nearest accepted names and listing the valid ones otherwise."""
    folded = _fold(name)
    canonical = _ALIASES.get(folded)
    if canonical is None:
        valid = ", ".join(list(SAMPLERS) + [f'"{display}"' for display in A1111_NAMES.values()])
        near = difflib.get_close_matches(folded, list(_ALIASES), n=3, cutoff=0.6)
        near_text = ", ".join(f"{n!r} ({_ALIASES[n]})" for n in near)
        what = "a sampler batchsd does not have" if folded in _NOT_HERE else "not a sampler name batchsd knows"
        hint = f"; nearest: {near_text}" if near else ""
        raise InputError(f"unknown sampler {name!r} ({what}){hint}; valid names: {valid}, and other tools' "
                         "names for these (k_euler, k_euler_ancestral, k_dpmpp_2m, ...)")
    return canonical


def a1111_name(canonical: str) -> str:
    """The A1111 display name of a canonical sampler name ("euler_a" -> "Euler a"); other names as given."""
    return A1111_NAMES.get(canonical, canonical)
