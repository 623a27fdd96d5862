"""Which model a run uses, and its identity (name, sha256) known before loading.

--model > $BATCHSD_MODEL > the one checkpoint in ./weights/ > an error saying where to put one.
"""
from __future__ import annotations

import os
from pathlib import Path

from batchsd.errors import BatchSDError
from batchsd.job.options import UsageError
from batchsd.job.resume import ModelIdentity
from batchsd.model.config import TINY_MODEL as TINY, TINY_MODEL_NAME

MODEL_ENV = "BATCHSD_MODEL"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt")


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet").is_dir()


def _weight_candidates(folder: Path) -> list[Path]:
    """Checkpoints in weights/: the folder itself if it is a diffusers folder, else its
    .safetensors/.ckpt files and diffusers subfolders (README.md and the like are not)."""
    if _is_diffusers_folder(folder):
        return [folder]
    return [p for p in sorted(folder.iterdir())
            if (p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES) or (p.is_dir() and _is_diffusers_folder(p))]


def resolve_model(model: str | None, cwd: Path | None = None) -> str:
    """--model > $BATCHSD_MODEL > the one checkpoint in ./weights/ > UsageError saying where to put one."""
    if model:
        choice, source = model, "--model"
    elif os.environ.get(MODEL_ENV):
        choice, source = os.environ[MODEL_ENV], f"${MODEL_ENV}"
    else:
        weights = (cwd or Path.cwd()) / "weights"
        found = _weight_candidates(weights) if weights.is_dir() else []
        if len(found) == 1:
            return str(found[0])
        if len(found) > 1:
            listing = "\n".join(f"  {p}" for p in found)
            raise UsageError(f"{weights} holds {len(found)} checkpoints; choose one with --model:\n{listing}")
        raise UsageError(f"no model given and none found: put one checkpoint (SD 1.x, SD 2.x or SDXL: .safetensors, .ckpt or a "
                         f"diffusers folder) in {weights}/, or pass --model PATH (or set ${MODEL_ENV}); "
                         "--model tiny runs a random tiny model (its images are noise) to try the tool")
    if choice == TINY:
        return choice
    path = Path(choice).expanduser()
    if not path.exists():
        raise UsageError(f"model {choice!r} (from {source}) does not exist: give the path of a .safetensors/.ckpt "
                         "file or a diffusers folder, or --model tiny")
    return str(path)



def model_default_size(model: str, prediction_type: str | None = None) -> int | None:
    """Width and height of the model's unsized text-to-image rows (its family's: 512 SD 1.x and
    2.x-base, 768 SD 2.x-v, 1024 SDXL; a diffusers folder's sample_size), read from the file without
    loading it; None for the tiny model (request.DEFAULT_SIZE) and for a file that does not load as
    given (the load then says why)."""
    if model == TINY:
        return None
    from batchsd.model.checkpoint import inspect_checkpoint

    try:
        report = inspect_checkpoint(Path(model), hash=False, prediction_type=prediction_type)
    except BatchSDError:
        return None
    return report.get("default_size") if report.get("loadable") else None


def with_model_default_size(opts, model: str | None = None, pipe=None):
    """`opts` with its manifest options' default_size set to the model's (model_default_size; a
    loaded `pipe`'s own). A dry run without a model to read plans unsized rows at request.DEFAULT_SIZE."""
    from dataclasses import replace

    if pipe is not None:
        size = pipe.default_size
    else:
        try:
            model = model or resolve_model(opts.model)
        except UsageError:
            if not opts.dry_run:
                raise
            return opts
        size = model_default_size(model, opts.prediction_type)
    return replace(opts, manifest_options=replace(opts.manifest_options, default_size=size))


def model_identity(model: str, prediction_type: str | None = None) -> ModelIdentity:
    """The identity Pipeline.load(model) will report, read from the file (no weights loaded)."""
    if model == TINY:
        return ModelIdentity(TINY_MODEL_NAME, None, prediction_type or "epsilon")
    from batchsd.model.checkpoint import inspect_checkpoint

    path = Path(model)
    try:
        report = inspect_checkpoint(path, prediction_type=prediction_type)
    except BatchSDError as e:
        raise UsageError(str(e)) from None
    if report.get("loadable") is False:
        raise UsageError(f"model {model} cannot be loaded: {report.get('error')}")
    return ModelIdentity(path.stem if path.is_file() else path.name, report["sha256"], report.get("prediction_type"))
