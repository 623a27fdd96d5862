"""batchsd: Stable Diffusion 1.x inference from scratch, run as a batch job processor."""
