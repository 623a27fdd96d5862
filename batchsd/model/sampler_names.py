"""Sampler names: the canonical names and the A1111 display names, in one table.

Every accepted spelling derives from `A1111_NAMES`: a canonical name or a display name, compared
case-insensitively with whitespace folded ("Euler a", "euler  A", " Euler_A "). Imports neither
torch nor numpy (the manifest validator uses it).
"""
from __future__ import annotations

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


def _fold(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


_ALIASES = {**{_fold(display): canonical for canonical, display in A1111_NAMES.items()},
            **{canonical: canonical for canonical in SAMPLERS}}


def resolve_sampler(name: str) -> str:
    """Canonical sampler name from a canonical or A1111 name (case-insensitive); InputError (a
    ValueError) listing the valid names otherwise."""
    canonical = _ALIASES.get(_fold(name))
    if canonical is None:
        valid = ", ".join(list(SAMPLERS) + [f'"{display}"' for display in A1111_NAMES.values()])
        raise InputError(f"unknown sampler {name!r}; valid names: {valid}")
    return canonical


def a1111_name(canonical: str) -> str:
    """The A1111 display name of a canonical sampler name ("euler_a" -> "Euler a"); other names as given."""
    return A1111_NAMES.get(canonical, canonical)
