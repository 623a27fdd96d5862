"""Load Stable Diffusion checkpoints into their model, safely and without doubling memory.

Accepted inputs (read by checkpoint_files.py):
- a single file in the original (CompVis) layout: `.safetensors` (JSON header, then each tensor read
  with pread straight into its destination) or `.ckpt`/`.pt`/`.bin` read with
  `torch.load(weights_only=True, mmap=True)`: a pickle that needs anything beyond tensors and plain
  containers is refused (CheckpointError), never executed. Tensors at the top level or under `state_dict`.
- a diffusers folder (`unet/`, `vae/`, `text_encoder/`, each with `*.safetensors`, `.fp16` variants
  or a sharded index), renamed to the original layout by `diffusers_layout`.

Loading: shapes (+ a diffusers folder's configs, the yaml beside a single file, the caller's
prediction type) -> the model family and its config (family.resolve_family) -> its
model built on the meta device -> our own strict key/shape check (a CheckpointError names missing,
mis-shaped and unexpected tensors) -> tensors copied one by one into freshly allocated tensors of the
target dtype/device -> `load_state_dict(assign=True)`. No file is mapped for safetensors; for .ckpt
each tensor's pages are dropped from the mapping once copied (madvise), so the peak resident memory
is the model's bytes plus about one tensor, whatever the source dtype (tests/tools/measure_load_memory.py
checks it).

This module holds the model side: `infer_config`, `check_keys`, the file hash
(`checkpoint_sha256`), and the public `load_model` / `inspect_checkpoint`.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from batchsd.errors import CheckpointError
from batchsd.model import hash_cache
from batchsd.model.checkpoint_files import SourceTensor, empty_for, materialize, open_checkpoint, read_into
from batchsd.model.config import SDConfig
from batchsd.model.family import (SD1, SUPPORTED, AmbiguousPredictionType, CheckpointHints, ModelFamily,
                                  check_prediction_type, detect_family, resolve_family)
from batchsd.model.page_advice import populate_ahead
from batchsd.model.stable_diffusion import CLIP_PREFIX

log = logging.getLogger(__name__)

# Non-model tensors released SD 1.x files carry (see shared/reference/sd15_keys.json): the DDPM
# schedule buffers of the training wrapper and CLIP's constant position ids. Ignored by name.
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
    CLIP_PREFIX + "embeddings.position_ids",
})
# EMA copies: `model_ema.decay`, `model_ema.num_updates` and, in full training files, the EMA weights
# under flattened names (`model_ema.diffusion_modelinput_blocks00weight`).
IGNORED_PREFIXES = ("model_ema.",)

SHOW_KEYS = 10  # how many key names an error message lists


# ----------------------------------------------------------------------------- config inference

def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def infer_config(state_dict: Mapping[str, Any]) -> SDConfig:
    """SDConfig from tensor shapes (original-layout keys of a single file; values: tensors or shapes), by
    the model family the keys belong to (family.detect_family: CheckpointError naming what the file
    looks like when none does). The prediction type is no part of it (family.resolve_family)."""
    shapes = {k: _shape(v) for k, v in state_dict.items()}
    return detect_family(shapes).infer_config(shapes)


# ----------------------------------------------------------------------------- checking

@dataclass
class KeyReport:
    """How a checkpoint's tensors compare with the model its shapes describe."""
    model: list[str] = field(default_factory=list)       # tensors the model has (loaded when all is well)
    missing: list[str] = field(default_factory=list)     # the model needs them, the file lacks them
    mis_shaped: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # key -> (file, model) shapes
    not_float: dict[str, str] = field(default_factory=dict)                   # key -> the file's dtype
    unexpected: list[str] = field(default_factory=list)  # under a model prefix, but not in the model
    ignored: list[str] = field(default_factory=list)     # known non-model tensors (IGNORED_*)
    extra: list[str] = field(default_factory=list)       # anything else: reported, not loaded
    problem: str | None = None                           # why it cannot be loaded, if it cannot


class _SkipInit(TorchFunctionMode):
    """Skips the in-place initialisers of torch.nn.init (the modules' reset_parameters) while a model
    is built on the meta device, where they have nothing to fill. Not only wasted: nn.Embedding's
    `normal_` on meta runs a Python decomposition whose first use imports torch._dynamo, a start-up
    cost paid for nothing. A torch function mode, so it holds for this thread only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_") and not name.startswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build_on_meta(cfg: SDConfig, family: ModelFamily = SD1) -> nn.Module:
    """The family's model for `cfg` on the meta device: shapes only, no memory, no init cost."""
    try:
        with torch.device("meta"), _SkipInit():
            return family.model_class(cfg)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f"the inferred configuration cannot be built: {e} ({cfg})") from e


def _non_finite_tensors(source, keys) -> list[str]:
    """The keys among `keys` whose tensor holds a NaN or an inf (read in its own dtype, one at a time)."""
    bad = []
    for key in keys:
        t = source.tensors[key]
        if t.dtype.is_floating_point:   # fp8 read as fp32: isfinite has no fp8 kernel
            dtype = t.dtype if t.dtype.itemsize > 1 else torch.float32
            value = materialize(source, key, dtype, torch.device("cpu"), torch.contiguous_format)
            if not torch.isfinite(value).all():
                bad.append(key)
    return bad


def _listing(keys: list[str], describe: Callable[[str], str] = str) -> str:
    shown = ", ".join(describe(k) for k in keys[:SHOW_KEYS])
    more = f", ... ({len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
    return f"{len(keys)}: {shown}{more}"


def check_keys(tensors: Mapping[str, SourceTensor], cfg: SDConfig | None,
               expected: Mapping[str, tuple[int, ...]], model_prefixes: Iterable[str] = (),
               family: ModelFamily | None = None) -> KeyReport:
    """Sort every tensor into model / ignored / unexpected / extra and find what is missing or wrong.
    `expected`: the model's keys and shapes; `model_prefixes`: its components' key prefixes (a key
    under one that the model lacks is unexpected, not extra); `family`: its `ignored` known tensors."""
    model_prefixes = tuple(model_prefixes)
    family_ignores = (lambda key: family.ignored(key, cfg)) if family is not None and cfg is not None else \
        (lambda key: False)
    r = KeyReport()
    for key, t in tensors.items():
        if key in expected:
            r.model.append(key)
            if t.shape != expected[key]:
                r.mis_shaped[key] = (t.shape, expected[key])
            elif not t.dtype.is_floating_point:
                r.not_float[key] = str(t.dtype).removeprefix("torch.")
        elif key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or family_ignores(key):
            r.ignored.append(key)
        elif cfg is not None and key.startswith(model_prefixes):
            r.unexpected.append(key)
        else:
            r.extra.append(key)
    r.missing = [k for k in expected if k not in tensors]
    problems = []
    if r.missing:
        problems.append(f"missing tensors {_listing(r.missing)}")
    if r.mis_shaped:
        problems.append("mis-shaped tensors " + _listing(
            list(r.mis_shaped), lambda k: f"{k} {list(r.mis_shaped[k][0])} (model needs {list(r.mis_shaped[k][1])})"))
    if r.not_float:
        problems.append("non-float tensors " + _listing(list(r.not_float), lambda k: f"{k} ({r.not_float[k]})"))
    if r.unexpected:
        problems.append(f"tensors the model does not have {_listing(r.unexpected)}")
    if problems:
        r.problem = f"does not match the {cfg.name} model inferred from its shapes: {'; '.join(problems)}"
    elif cfg is not None and cfg.unet.in_channels != cfg.vae.latent_channels:
        r.problem = (f"the UNet takes {cfg.unet.in_channels} input channels, not the {cfg.vae.latent_channels} "
                     f"latent channels: this is an inpainting (9) or depth (5) or other variant model; "
                     f"batchsd runs {SUPPORTED} text-to-image models")
    return r


# ----------------------------------------------------------------------------- hashing

_hash_cache: dict[str, str] = {}


def checkpoint_sha256(files: list[Path]) -> str:
    """sha256 of the files' bytes in the given order, streamed; kept per version of the files in this
    process and across processes (hash_cache.py: a checkpoint is hashed once per version, not per run)."""
    key = hash_cache.stamp(files)
    if key not in _hash_cache:
        value = hash_cache.lookup(key)
        if value is None:
            digest = hashlib.sha256()
            buffer = bytearray(8 << 20)
            view = memoryview(buffer)
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    while n := fh.readinto(buffer):
                        digest.update(view[:n])
            value = digest.hexdigest()
            hash_cache.store(key, value)
        _hash_cache[key] = value
    return _hash_cache[key]


# ----------------------------------------------------------------------------- public API

@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    format: str                 # "safetensors" | "ckpt" | "diffusers"
    layout: str                 # "single-file" | "diffusers"
    dtype: str                  # the file's model-tensor dtype(s), e.g. "float16" or "float16+float32"
    config_name: str            # "sd15", "sd21", "tiny" or "custom"
    config: SDConfig
    family: str                 # family.FAMILIES key, e.g. "sd1", "sd2-v"
    sha256: str                 # of the file; of a folder's weight files in sorted order
    extra_keys: tuple[str, ...] = ()    # unknown non-model tensors, not loaded
    ignored_count: int = 0              # known non-model tensors (EMA, DDPM buffers, position_ids, ...)
    # the family as resolved for this checkpoint (its prediction type, scheduler values and default
    # size, which a diffusers folder's configs may set): what Pipeline runs it with
    model_family: ModelFamily | None = None
    files_stamp: str = ""               # hash_cache.stamp of the files read: read_part checks it

    @property
    def short_hash(self) -> str:
        """First 10 hex digits of sha256: the A1111 "Model hash"."""
        return self.sha256[:10]


def _dtype_summary(tensors: Mapping[str, SourceTensor], keys: Iterable[str]) -> str:
    counts = Counter(str(tensors[k].dtype).removeprefix("torch.") for k in keys)
    return "+".join(name for name, _ in counts.most_common()) or "none"


def _hints(source, prediction_type: str | None) -> CheckpointHints:
    return CheckpointHints(layout=source.layout, configs=source.configs,
                           yaml_path=str(source.yaml_path) if source.yaml_path else None,
                           yaml_prediction_type=source.yaml_prediction_type,
                           prediction_type=check_prediction_type(prediction_type))


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               memory_format: torch.memory_format = torch.contiguous_format, prediction_type: str | None = None,
               defer: tuple[str, ...] = ()) -> tuple[nn.Module, CheckpointInfo]:
    """Load a single-file checkpoint or diffusers folder into an eval-mode model of its family
    (SD 1.x: StableDiffusionModel, SD 2.x: StableDiffusion2Model).
    4-D tensors (convolution weights) are written straight in `memory_format` (Pipeline: channels_last),
    so no second copy is made to change their layout.
    `prediction_type`: "epsilon" | "v_prediction" | None (what the checkpoint says: family.py's rule).
    `defer`: components (family prefixes' names, e.g. "unet") whose tensors are checked but not read:
    they stay on the meta device until `read_part` reads them (residency.CpuReread).

    Raises CheckpointError (missing / mis-shaped / unexpected tensors named, unsafe pickle, unsupported
    model, an SD 2.x single file that does not say its prediction type). The file's sha256 is computed
    on a second thread while the tensors load.
    """
    device = torch.device(device)
    with open_checkpoint(path) as source, ThreadPoolExecutor(1) as pool:
        shapes = {k: t.shape for k, t in source.tensors.items()}
        try:
            family, cfg = resolve_family(shapes, _hints(source, prediction_type), source.skipped)
        except AmbiguousPredictionType as e:
            raise AmbiguousPredictionType(f"{source.path}: {e}", e.family, e.cfg) from None
        except CheckpointError as e:
            raise CheckpointError(f"{source.path}: {e}") from None
        model = build_on_meta(cfg, family)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        report = check_keys(source.tensors, cfg, expected, family.prefixes.values(), family)
        if report.problem:
            raise CheckpointError(f"{source.path}: {report.problem}")
        if report.extra:
            log.warning("%s: ignoring unknown tensors %s", source.path, _listing(report.extra))
        sha256 = pool.submit(checkpoint_sha256, source.identity_files)

        deferred = tuple(family.prefixes[name] for name in defer)
        files_stamp = hash_cache.stamp(source.identity_files)
        state_dict = _read_tensors(source, [k for k in expected if not k.startswith(deferred)], dtype, device,
                                   memory_format)
        model.load_state_dict(state_dict, strict=not deferred, assign=True)
        del state_dict
        left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                        if t.is_meta and not n.startswith(deferred)]
        if left_on_meta:  # a module with a non-persistent buffer would need computing after the load
            raise RuntimeError(f"tensors not materialized by the checkpoint: {left_on_meta[:SHOW_KEYS]}")
        info = CheckpointInfo(
            path=source.path, format=source.format, layout=source.layout,
            dtype=_dtype_summary(source.tensors, report.model), config_name=cfg.name, config=cfg,
            family=family.name, sha256=sha256.result(), extra_keys=tuple(report.extra),
            ignored_count=len(report.ignored), model_family=family, files_stamp=files_stamp)
    return model.eval().requires_grad_(False), info


def _read_tensors(source, keys: list[str], dtype: torch.dtype, device: torch.device,
                  memory_format: torch.memory_format) -> dict[str, torch.Tensor]:
    """The tensors `keys` of `source`, each in a freshly allocated tensor of the target dtype/device."""
    # every tensor allocated first, so that a second thread can map their pages ahead of the reads
    state_dict = {key: empty_for(source, key, dtype, device, memory_format) for key in keys}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # copies are memory-bound; extra threads only contend (page faults)
    try:
        with populate_ahead(list(state_dict.values())):
            for key, out in state_dict.items():
                read_into(source, key, out)
    finally:
        torch.set_num_threads(threads)
    return state_dict


def read_part(path: str | Path, model: nn.Module, part: nn.Module, dtype: torch.dtype,
              memory_format: torch.memory_format, files_stamp: str) -> None:
    """Read `part` (a submodule of `model`, as `load_model` built it) again from the checkpoint at `path`,
    converted as `load_model` converts it (the same bits), replacing its tensors. CheckpointError when
    the files are no longer those `load_model` read (`files_stamp`, CheckpointInfo.files_stamp)."""
    prefix = next(name for name, m in model.named_modules() if m is part) + "."
    with open_checkpoint(path) as source:
        if hash_cache.stamp(source.identity_files) != files_stamp:
            raise CheckpointError(f"{source.path} changed since the run loaded it (it reads part of the model "
                                  "again, --low-memory): put the file back, or run again to use the new one")
        keys = [prefix + key for key in part.state_dict()]
        state_dict = _read_tensors(source, keys, dtype, torch.device("cpu"), memory_format)
    part.load_state_dict({key[len(prefix):]: t for key, t in state_dict.items()}, strict=True, assign=True)


def inspect_checkpoint(path: str | Path, hash: bool = True, prediction_type: str | None = None,
                       check_values: bool = False) -> dict:
    """A JSON-friendly description of a checkpoint, for `batchsd inspect`; reads no tensor data unless
    `check_values` (then each model tensor is read, one at a time, and those holding NaN or inf are
    listed in "non_finite": such weights make blank images, and the file is not loadable).
    "family": "SD 1.x", "SD 2.x-v", "SD 2.x-eps", or "SD 2.x (prediction type unknown: ...)" for an
    SD 2.x single file that does not say it (not loadable as given: "error" says how to tell it);
    `prediction_type` as for load_model.

    Raises CheckpointError only when the file cannot be read at all (unsafe pickle, not a checkpoint);
    a readable file that cannot be loaded has "loadable": False and the reason in "error".
    """
    with open_checkpoint(path) as source:
        tensors = source.tensors
        shapes = {k: t.shape for k, t in tensors.items()}
        family = cfg = label = ambiguous = None
        try:
            try:
                family, cfg = resolve_family(shapes, _hints(source, prediction_type), source.skipped)
                label = family.label
            except AmbiguousPredictionType as e:  # the shapes are fine: report them, say what is unknown
                family, cfg = e.family, e.cfg
                label = (f"{family.generation} (prediction type unknown: no prediction_type argument, "
                         f"no {Path(source.path).stem}.yaml beside the file)")
                ambiguous = str(e)
            expected = {k: tuple(v.shape) for k, v in build_on_meta(cfg, family).state_dict().items()}
            report = check_keys(tensors, cfg, expected, family.prefixes.values(), family)
            error = report.problem or ambiguous
        except CheckpointError as e:  # no config: every tensor is extra or ignored
            cfg, error, label = None, str(e), None
            report = check_keys(tensors, None, {})
        # per component of its family (no family: SD 1.x's component names, all counts 0)
        components = (family or SD1).prefixes
        out = {
            "path": str(source.path), "format": source.format, "layout": source.layout,
            "files": [str(f) for f in source.files], "size_bytes": sum(f.stat().st_size for f in source.files),
            "family": label,
            "generation": family.generation if label else None,   # "SD 1.x" | "SD 2.x" | "SDXL"
            "prediction_type": family.scheduler.prediction_type if label and not ambiguous else None,
            "default_size": family.default_size if label and not ambiguous else None,
            "config": cfg.name if cfg else None, "config_detail": asdict(cfg) if cfg else None,
            "loadable": error is None, "error": error,
            "tensors": len(tensors),
            "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
            "model_dtype": _dtype_summary(tensors, report.model),
            "model_tensors": len(report.model),
            "parameters": sum(math.prod(tensors[k].shape) for k in report.model),
            "components": {name: sum(k.startswith(p) for k in report.model) for name, p in components.items()},
            "ignored": len(report.ignored), "extra": report.extra, "missing": report.missing,
            "unexpected": report.unexpected,
            "mis_shaped": {k: [list(a), list(b)] for k, (a, b) in report.mis_shaped.items()},
            "not_float": report.not_float, "non_tensor_entries": source.skipped,
        }
        if check_values and cfg is not None:
            out["non_finite"] = _non_finite_tensors(source, report.model)
            if out["non_finite"] and out["loadable"]:
                out["loadable"] = False
                out["error"] = (f"{len(out['non_finite'])} weight tensor(s) hold NaN or inf values (first: "
                                f"{out['non_finite'][0]}): the model would make blank images; re-download the file")
        files = source.identity_files
    if hash:
        out["sha256"] = checkpoint_sha256(files)
        out["short_hash"] = out["sha256"][:10]
    return out
