"""Print the parity figures the tests assert, as a table: `python tests/tools/parity_report.py`.

Per component (TINY, fp32): max abs difference against diffusers/transformers.
Per sampler, end to end (TINY, fp32, text-to-image and image-to-image): share of pixels within 1/255
of diffusers' image and the final latents' relative difference (max abs diff / max abs).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model"))  # tests/model

import test_pipeline_parity as parity  # noqa: E402
from batchsd import GenerationRow  # noqa: E402
from batchsd.model.config import TINY  # noqa: E402
from batchsd.model.tokenizer import tokenize  # noqa: E402


def component_figures(models) -> list[tuple[str, float]]:
    ours = models["ours"].model
    ids, _ = tokenize(["a photo of a cat", "", "an oil painting of a lighthouse at dusk, detailed"])
    with torch.no_grad():
        clip = (ours.text_encoder(ids) - models["clip"](ids).last_hidden_state).abs().max().item()
        image = torch.rand(2, 3, 96, 64) * 2 - 1
        mean, logvar = ours.vae.encode(image)
        posterior = models["vae"].encode(image).latent_dist
        enc = max((mean - posterior.mean).abs().max().item(), (logvar - posterior.logvar).abs().max().item())
        z = torch.randn(2, 4, 12, 8)
        dec = (ours.vae.decode(z) - models["vae"].decode(z).sample).abs().max().item()
        x = torch.randn(3, 4, 12, 8)
        t = torch.tensor([957.3, 400.0, 1.5])
        ctx = torch.randn(3, 77, TINY.unet.context_dim)
        unet = (ours.unet(x, t, ctx) - models["unet"](x, t, ctx).sample).abs().max().item()
    return [("CLIP text encoder", clip), ("VAE encode (mean, logvar)", enc), ("VAE decode", dec), ("UNet", unet)]


def main() -> None:
    import tempfile

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    models = parity.build_models(tempfile.mkdtemp(prefix="batchsd-parity"))
    print("| component (TINY, fp32) | max abs diff |\n|---|---|")
    for name, value in component_figures(models):
        print(f"| {name} | {value:.2e} |")
    print("\n| sampler | mode | pixels within 1/255 | latents rel diff |\n|---|---|---|---|")
    for sampler in parity.SAMPLERS:
        cases = [("txt2img 64x64 6 steps", GenerationRow("a red cube", negative_prompt="blurry", seed=0, steps=6,
                                                         sampler=sampler, width=64, height=64)),
                 ("txt2img 96x64 4 steps", GenerationRow("a red cube", seed=1234, steps=4, sampler=sampler,
                                                         width=96, height=64)),
                 ("img2img 72x64 s=0.75", GenerationRow("a landscape", seed=7, steps=8, cfg_scale=5.0, sampler=sampler,
                                                        init_image=parity.init_image(72, 64, 7), strength=0.75))]
        for mode, row in cases:
            out = models["ours"].generate([row])
            image_ref, latents_ref = parity.reference_run(models, sampler, row)
            agree = (np.abs(np.asarray(out.images[0], np.int16) - image_ref.astype(np.int16)) <= 1).mean()
            rel = ((out.latents - latents_ref).abs().max() / latents_ref.abs().max()).item()
            print(f"| {sampler} | {mode} | {agree:.5f} | {rel:.2e} |")


if __name__ == "__main__":
    main()
