"""The Stable Diffusion library: models, samplers, checkpoint reading, the Pipeline. Knows nothing of jobs."""
