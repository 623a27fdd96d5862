"""batchsd: Stable Diffusion (SD 1.x, SD 2.x) inference from scratch, run as a batch job processor.

    from batchsd import Pipeline, GenerationRow
    pipe = Pipeline.load("weights/v1-5-pruned-emaonly.safetensors")   # or "tiny"
    out = pipe.generate([GenerationRow("a photo of a cat", seed=1)])
    out.images[0].save("cat.png")

The public names are imported lazily, so `import batchsd.job.manifest` (the CLI's validate path)
does not pay for torch and the models.
"""
import os

from batchsd.errors import BatchSDError, CheckpointError, InputError

# Exact mode's MKL setting (model/fast/exact.py, mkl_strict): MKL's strict reproducible mode, whose
# fp32 products do not depend on the thread count. MKL reads MKL_CBWR at its first call, so it is set
# on import, before batchsd's first product; a value the user set is kept (and exact mode says so).
MKL_CBWR_STRICT = "AUTO,STRICT"
os.environ.setdefault("MKL_CBWR", MKL_CBWR_STRICT)

__all__ = ["Pipeline", "GenerationRow", "GenerationOutput", "BatchSDError", "InputError", "CheckpointError"]


def __getattr__(name: str):
    if name == "GenerationRow":
        from .model.request import GenerationRow

        return GenerationRow
    if name in ("Pipeline", "GenerationOutput"):
        from .model import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'batchsd' has no attribute {name!r}")
