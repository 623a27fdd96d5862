"""The parity rule of the image tests against the reference pipelines, in one place: at least
PIXEL_SHARE of the 8-bit pixel values within PIXEL_TOL of the reference's, and the latents within a
relative tolerance the caller states (its module's LATENT_REL_TOL). Each comparison's figures go to
FIGURES, which tests/model/conftest.py prints at the end of the session (pytest -s shows them); a
module adds its own lines there too."""
from __future__ import annotations

import numpy as np
import torch

PIXEL_TOL = 1          # out of 255
PIXEL_SHARE = 0.999
FIGURES: list[str] = []


def assert_image_parity(name: str, image, latents: torch.Tensor, image_ref: np.ndarray, latents_ref: torch.Tensor,
                        latent_rel_tol: float) -> tuple[float, float]:
    """`image` (PIL) and `latents` [1, C, h, w] against the reference's uint8 HWC image and latents;
    returns (share of pixel values within PIXEL_TOL, latents' max abs difference / max abs value)."""
    ours = np.asarray(image, dtype=np.int16)
    assert ours.shape == image_ref.shape
    diff = np.abs(ours - image_ref.astype(np.int16))
    agree = (diff <= PIXEL_TOL).mean()
    rel = ((latents - latents_ref).abs().max() / latents_ref.abs().max()).item()
    if name:
        FIGURES.append(f"{name:48s} latents rel {rel:.1e}  pixels max |diff| {diff.max()}  within 1/255 {agree:.5f}")
    assert rel <= latent_rel_tol, f"latents differ: {rel:.2e} relative"
    assert agree >= PIXEL_SHARE, f"only {agree:.5f} of pixels within {PIXEL_TOL}/255"
    return agree, rel
