"""Which model makes each row, and the models' identities (name, sha256) known before loading.

The run's model: --model > $BATCHSD_MODEL > the one checkpoint in ./weights/ > an error saying
where to put one. A row with a `model` cell is made by the checkpoint it names (`find_row_model`);
the run then loads each model once, in order of first use (run.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from batchsd.errors import BatchSDError
from batchsd.job.options import UsageError
from batchsd.job.resume import ModelIdentity, RowModels
from batchsd.model.config import TINY_MODEL as TINY, TINY_MODEL_NAME

MODEL_ENV = "BATCHSD_MODEL"
WEIGHTS_DIR = Path("weights")
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
        weights = (cwd or Path.cwd()) / WEIGHTS_DIR
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
        link = f" (a link to {os.readlink(path)}, which does not exist)" if path.is_symlink() else ""
        raise UsageError(f"model {choice!r} (from {source}) does not exist{link}: give the path of a .safetensors/.ckpt "
                         "file or a diffusers folder, or --model tiny")
    return str(path)



@dataclass(frozen=True)
class ModelFacts:
    """What a model's header tells before it loads."""
    # width and height of its unsized text-to-image rows: its family's (512 SD 1.x and 2.x-base, 768
    # SD 2.x-v, 1024 SDXL) or a diffusers folder's sample_size; None: request.DEFAULT_SIZE (tiny)
    default_size: int | None
    generation: str | None     # "SD 1.x" | "SD 2.x" | "SDXL" (model/family.py), what LoRAs are checked against


def model_facts(model: str, prediction_type: str | None = None) -> tuple[ModelFacts | None, str | None]:
    """(its facts, None) for a model that loads as given, or (None, why it cannot); reads the file's
    header and shapes, no weights."""
    if model == TINY:
        return ModelFacts(None, "SD 1.x"), None
    from batchsd.model.checkpoint import inspect_checkpoint

    try:
        report = inspect_checkpoint(Path(model), hash=False, prediction_type=prediction_type)
    except BatchSDError as e:
        return None, f"{model} cannot be read: {e}"
    if not report.get("loadable"):
        return None, f"{model} cannot be run: {report.get('error')}"
    return ModelFacts(report.get("default_size"), report.get("generation")), None


def prediction_type_override(model: str, prediction_type: str | None) -> str | None:
    """A warning when --prediction-type differs from what the model itself says (a diffusers folder's
    scheduler config, the .yaml beside a file, or a family that has one prediction type): the option
    wins, as documented, but a folder's config is otherwise authoritative. None when they agree, when
    the model says nothing (an SD 2.x file without a yaml) or for the tiny model."""
    if prediction_type is None or model == TINY:
        return None
    from batchsd.model.checkpoint import inspect_checkpoint

    try:
        stated = inspect_checkpoint(Path(model), hash=False).get("prediction_type")
    except BatchSDError:
        return None
    if stated is None or stated == prediction_type:
        return None
    return (f"--prediction-type {prediction_type} overrides the {stated} that {model} says (its scheduler config, "
            f".yaml or family): its images are made as {prediction_type}")


def with_model_defaults(opts, model: str | None = None, pipe=None):
    """`opts` with what reading its manifest needs from the models: the run model's default size and
    generation (model_facts; a loaded `pipe`'s own), the --prediction-type rows' models are read with,
    and the weights folder their names are looked up in. Without a run model to read (none given, or
    only rows that name their own), unsized rows without a `model` cell are planned at
    request.DEFAULT_SIZE and their LoRAs are not checked against a family; a run that needs the run's
    model says so later (`run_model_for`)."""
    from dataclasses import replace

    if pipe is not None:
        facts = ModelFacts(pipe.default_size, pipe.family.generation)
    else:
        try:
            model = model or resolve_model(opts.model)
        except UsageError:
            model = None
        facts = model_facts(model, opts.prediction_type)[0] if model is not None else None
    return replace(opts, manifest_options=replace(opts.manifest_options,
                                                  default_size=facts.default_size if facts else None,
                                                  model_generation=facts.generation if facts else None,
                                                  prediction_type=opts.prediction_type,
                                                  weights_dir=opts.manifest_options.weights_dir or WEIGHTS_DIR.resolve()))


def model_key(model: str) -> str:
    """The one name of a model in a run (what Pipeline.load is given): "tiny" or an absolute path,
    so that --model and a row's cell naming the same file are one model, loaded once. Links are not
    followed: a file is read as the path the user gave (its name, and the A1111 `.yaml` beside it,
    as A1111 reads a linked checkpoint), the same in inspect, validate and run."""
    return model if model == TINY else os.path.abspath(Path(model).expanduser())


def find_row_model(value: str, manifest_dir: Path, weights_dir: Path | None = None) -> str:
    """The model a `model` cell names, as a model_key: "tiny"; else a file or diffusers folder at the
    path as written (absolute, or relative to the manifest's folder or to the working folder); else a
    name in `weights_dir` (./weights): as written, or with .safetensors or .ckpt added. Other folders
    (an output folder of the same name) do not count. Raises ValueError (why, and the fix) when
    nothing or two different checkpoints match."""
    if value == TINY:
        return TINY
    weights = weights_dir or WEIGHTS_DIR
    given = Path(value).expanduser()
    candidates = [given] if given.is_absolute() else [Path(manifest_dir) / given, given]
    candidates += [weights / value] + [weights / (value + suffix) for suffix in WEIGHT_SUFFIXES
                                       if not value.lower().endswith(suffix)]
    found_at: dict[str, str] = {}   # the file itself -> the first path to it (model_key: links kept)
    for p in candidates:
        if p.is_file() or _is_diffusers_folder(p):
            found_at.setdefault(os.path.realpath(p), os.path.abspath(p))
    found = list(found_at.values())
    if len(found) > 1:
        raise ValueError(f"{value!r} names {len(found)} different checkpoints: {' and '.join(found)}; write the "
                         "path of the one meant (absolute, or relative to the manifest's folder)")
    if not found:
        raise ValueError(f"no checkpoint {value!r}: not a path (absolute, or relative to the manifest's folder "
                         f"{manifest_dir} or the working folder) nor a name in {weights}/ (as written, or with "
                         f"{' or '.join(WEIGHT_SUFFIXES)}); give the path of a .safetensors/.ckpt file or a diffusers "
                         "folder, or 'tiny'")
    return found[0]


def resolve_row_models(values: list, manifest_dir: Path, weights_dir: Path | None,
                       prediction_type: str | None) -> tuple[list, dict[str, ModelFacts], dict[int, str]]:
    """A manifest's `model` cells (None where empty) -> (each row's model_key or None, each model's
    ModelFacts, {row index: why its cell cannot be used}). Each distinct cell is looked up and each
    model's header read once."""
    keys: list = [None] * len(values)
    facts: dict[str, ModelFacts] = {}
    problems: dict[int, str] = {}
    looked_up: dict[str, tuple[str | None, str | None]] = {}
    for i, value in enumerate(values):
        if value is None:
            continue
        if value not in looked_up:
            try:
                key = find_row_model(value, manifest_dir, weights_dir)
            except ValueError as e:
                looked_up[value] = (None, str(e))
            else:
                found, why = model_facts(key, prediction_type)
                if found is not None:
                    facts[key] = found
                looked_up[value] = (None, why) if why else (key, None)
        key, why = looked_up[value]
        if why:
            problems[i] = why
        else:
            keys[i] = key
    return keys, facts, problems


def run_model_for(opts, rows) -> str | None:
    """The run's model as a model_key, when it is needed: some row has no `model` cell, or --model
    (or $BATCHSD_MODEL) is given; None when every row names its own. UsageError as resolve_model."""
    if all(r.model is not None for r in rows) and not (opts.model or os.environ.get(MODEL_ENV)):
        return None
    return model_key(resolve_model(opts.model))


def row_models(rows, run_model: str | None, prediction_type: str | None, planned) -> RowModels:
    """The identity (model_identity: the file's sha256, no weights loaded) and numerics
    (`planned(prediction_type)`) of every model `rows` use; `run_model` (a model_key) makes the rows
    without a `model` cell. UsageError when a model cannot be loaded."""
    by_key = {}
    for key in dict.fromkeys(r.model or run_model for r in rows):
        if key is None:
            raise UsageError("rows without a model cell need the run's model: pass --model")
        identity = model_identity(key, prediction_type)
        by_key[key] = (identity, planned(identity.prediction_type))
    return RowModels(by_key, run_model)


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
