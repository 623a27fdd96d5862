"""batchsd: Stable Diffusion 1.x inference from scratch, run as a batch job processor.

    from batchsd import Pipeline, GenerationRow
    pipe = Pipeline.load("weights/v1-5-pruned-emaonly.safetensors")   # or "tiny"
    out = pipe.generate([GenerationRow("a photo of a cat", seed=1)])
    out.images[0].save("cat.png")
"""
from .errors import BatchSDError, CheckpointError, InputError
from .pipeline import GenerationOutput, GenerationRow, Pipeline

__all__ = ["Pipeline", "GenerationRow", "GenerationOutput", "BatchSDError", "InputError", "CheckpointError"]
