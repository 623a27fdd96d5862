"""What a caller asks for, and the rules a request must follow: `GenerationRow`, its limits and
defaults, the image-to-image step count, the batch key, `resolve_size` and `check_row`.

The one home of these rules: `Pipeline` and the job's manifest validator both use them. Imports
neither torch nor numpy, so validating a manifest stays light (`import batchsd.job.manifest`).
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import TYPE_CHECKING, Mapping

from batchsd.errors import InputError
from batchsd.model.init_pixels import init_image_problem
from batchsd.model.prompt_syntax import PROMPT_SYNTAXES, chunk_count, unsupported_a1111
from batchsd.model.sampler_names import resolve_sampler

if TYPE_CHECKING:
    from PIL import Image

# limits (inclusive unless said otherwise)
MIN_SIZE = 64                  # width and height, pixels
MAX_SIZE = 2048
SIZE_MULTIPLE = 8              # the VAE's downscale factor: latents are (H/8, W/8)
MAX_STEPS = 999               # the schedules take 1..num_train_timesteps - 1 (1000 - 1) steps
SEED_LIMIT = 2 ** 63           # seeds are 0 <= seed < SEED_LIMIT (a CPU generator takes any int64)
MAX_CFG_SCALE = 100.0          # far above useful guidance; unbounded scales overflow into NaN (black) images
MAX_CONDITIONING_SIZE = 16384  # SDXL's original_width/height and crop_top/left (pixels)
MAX_CLIP_SKIP = 12             # A1111's range (1 = the text encoder's last layer)
MAX_LORA_MULTIPLIER = 100.0    # |multiplier| of a LoRA; far above useful strengths (overflow beyond)

# defaults
DEFAULT_STEPS = 25
DEFAULT_CFG_SCALE = 7.5
DEFAULT_SAMPLER = "dpmpp_2m_karras"
DEFAULT_SIZE = 512             # text-to-image width and height (the SD 1.x training size)
DEFAULT_STRENGTH = 0.75


@dataclass(frozen=True)
class GenerationRow:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    sampler: str = DEFAULT_SAMPLER
    width: int | None = None      # text-to-image default DEFAULT_SIZE; image-to-image: the init image's size // 8 * 8
    height: int | None = None
    init_image: Image.Image | None = None
    strength: float = DEFAULT_STRENGTH  # image-to-image only: the share of the schedule that is run
    # SDXL's size/crop micro-conditioning (other families refuse them): the size the model is told the
    # training image had (default: the row's own size) and its crop's top-left corner (default 0, 0)
    original_width: int | None = None
    original_height: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    prompt_syntax: str = "plain"   # prompt_syntax.PROMPT_SYNTAXES: how prompt and negative_prompt are read
    clip_skip: int | None = None   # A1111's clip skip (1 = last layer, 2 = penultimate, ...); None = the model's
    # LoRA adapter set: (file path, multiplier) pairs, applied in this order (model/lora.py); rows of one
    # generate() call share it
    loras: tuple[tuple[str, float], ...] = ()
    # textual-inversion embedding files (model/embeddings.py) the row's prompts may name, each by its file
    # stem (A1111: every embedding in the folder is active; the job passes those a row names)
    embeddings: tuple[str, ...] = ()


SIZE_CONDITIONING = ("original_width", "original_height", "crop_top", "crop_left")  # GenerationRow fields

def img2img_steps(steps: int, strength: float) -> int:
    """Steps an image-to-image row runs: the last int(steps * strength) of its `steps`-step schedule
    (diffusers' get_timesteps); it starts at step index `steps - img2img_steps(...)`."""
    return min(int(steps * strength), steps)


def batch_key(width: int, height: int, steps: int, sampler: str, img2img_steps: int | None,
              context_chunks: int = 1, loras: tuple = ()) -> tuple:
    """Rows with equal keys can share UNet forwards (one `Pipeline.generate` call): same latent size,
    same schedule (`sampler`: its canonical name), the same steps run (`img2img_steps`: that
    count for image-to-image rows, None for text-to-image), the same text context length
    (`context_chunks` of 77 tokens: `prompt_chunks`) and the same LoRA set (`loras`: (path,
    multiplier) pairs). Prompts, seeds and cfg_scale may differ."""
    return (width, height, steps, sampler, img2img_steps, context_chunks, tuple(loras))


def prompt_chunks(prompt_syntax: str, prompt: str, negative_prompt: str,
                  embeddings: Mapping[str, int] | None = None) -> int:
    """77-token chunks of a row's text context: 1 for plain prompts, else the longer of its prompt's
    and negative prompt's A1111 chunk counts, with `embeddings` (name -> vector count) named in them
    (loads the tokenizer)."""
    if prompt_syntax == "plain":
        return 1
    return max(chunk_count(prompt, embeddings), chunk_count(negative_prompt, embeddings))


def resolve_size(row: GenerationRow, default_size: int = DEFAULT_SIZE) -> tuple[int, int]:
    """(width, height) the row is made at: given, else the init image's size rounded down to a
    multiple of SIZE_MULTIPLE, else `default_size`."""
    if row.init_image is not None:
        w0, h0 = row.init_image.size
        return (row.width if row.width is not None else w0 // SIZE_MULTIPLE * SIZE_MULTIPLE,
                row.height if row.height is not None else h0 // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return (row.width if row.width is not None else default_size,
            row.height if row.height is not None else default_size)


def _whole(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value) -> bool:
    """A finite real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_loras(loras, where: str = "loras") -> None:
    """InputError unless `loras` is a sequence of (path, multiplier) pairs with finite multipliers
    within +-MAX_LORA_MULTIPLIER (the job's `loras` column and tags follow the same rule)."""
    if isinstance(loras, (str, bytes, os.PathLike)) or not isinstance(loras, (tuple, list)):
        raise InputError(f"{where}: {loras!r} must be a tuple of (path, multiplier) pairs")
    for entry in loras:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], (str, os.PathLike)):
            raise InputError(f"{where}: {entry!r} is not a (path, multiplier) pair")
        if not _real(entry[1]) or abs(entry[1]) > MAX_LORA_MULTIPLIER:
            raise InputError(f"{where}: the multiplier {entry[1]!r} of {entry[0]} must be a finite number between "
                             f"-{MAX_LORA_MULTIPLIER:g} and {MAX_LORA_MULTIPLIER:g}")


def row_batch_key(row: GenerationRow, default_size: int = DEFAULT_SIZE) -> tuple:
    """`batch_key` of a GenerationRow (unsized text-to-image rows at `default_size`)."""
    width, height = resolve_size(row, default_size)
    run = img2img_steps(row.steps, row.strength) if row.init_image is not None else None
    vectors = None
    if row.embeddings and row.prompt_syntax != "plain":
        from batchsd.model.embeddings import embedding_vectors   # reads the files (torch): only when named

        vectors = embedding_vectors(row.embeddings)
    return batch_key(width, height, row.steps, resolve_sampler(row.sampler), run,
                     prompt_chunks(row.prompt_syntax, row.prompt, row.negative_prompt, vectors), row.loras)


def plain_numbers(row: GenerationRow) -> GenerationRow:
    """`row` with its numbers as Python's int and float (numpy scalars pass `check_row` as numbers,
    and torch takes only Python ints for seeds). Call after check_row."""
    ints = {name: int(getattr(row, name)) for name in ("seed", "steps", "width", "height", "clip_skip",
                                                       *SIZE_CONDITIONING) if getattr(row, name) is not None}
    floats = {name: float(getattr(row, name)) for name in ("cfg_scale", "strength") if _real(getattr(row, name))}
    loras = tuple((path, float(multiplier)) for path, multiplier in row.loras)
    return replace(row, **ints, **floats, loras=loras, embeddings=tuple(row.embeddings))


def check_row(row: GenerationRow, position: int = 0) -> None:
    """Raise InputError naming the field and the fix for a row that cannot be run as given."""
    where = f"row {position}"

    def bad(field_name: str, message: str) -> InputError:
        return InputError(f"{where}, {field_name}: {message}")

    if not isinstance(row, GenerationRow):
        raise InputError(f"{where}: {type(row).__name__} is not a GenerationRow")
    if not isinstance(row.prompt, str) or not isinstance(row.negative_prompt, str):
        raise bad("prompt", "prompt and negative_prompt must be strings")
    check_loras(row.loras, f"{where}, loras")
    if isinstance(row.embeddings, (str, bytes, os.PathLike)) or not isinstance(row.embeddings, (tuple, list)) \
            or not all(isinstance(p, (str, os.PathLike)) for p in row.embeddings):
        raise bad("embeddings", f"{row.embeddings!r} must be a tuple of embedding file paths")
    if row.prompt_syntax not in PROMPT_SYNTAXES:
        raise bad("prompt_syntax", f"{row.prompt_syntax!r} is not one of {', '.join(PROMPT_SYNTAXES)}")
    if row.prompt_syntax == "a1111":
        for name in ("prompt", "negative_prompt"):
            if why := unsupported_a1111(getattr(row, name)):
                raise bad(name, why)
    if row.clip_skip is not None and (not _whole(row.clip_skip) or not 1 <= row.clip_skip <= MAX_CLIP_SKIP):
        raise bad("clip_skip", f"{row.clip_skip!r} must be an integer in 1..{MAX_CLIP_SKIP} (1 = the last layer), "
                  f"or empty")
    stems = [PurePath(p).stem.lower() for p in row.embeddings]
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise bad("embeddings", f"two embedding files share the name {twice[0]!r}: a prompt names an "
                  "embedding by its file stem; rename one")
    if not _whole(row.seed) or not 0 <= row.seed < SEED_LIMIT:
        raise bad("seed", f"{row.seed!r} is not an integer in [0, 2**{SEED_LIMIT.bit_length() - 1})")
    if not _whole(row.steps) or not 1 <= row.steps <= MAX_STEPS:
        raise bad("steps", f"{row.steps!r} is not an integer in 1..{MAX_STEPS}")
    if not _real(row.cfg_scale) or not 0 <= row.cfg_scale <= MAX_CFG_SCALE:
        raise bad("cfg_scale", f"{row.cfg_scale!r} must be a finite number in 0..{MAX_CFG_SCALE:g}")
    if row.init_image is not None:
        if not (hasattr(row.init_image, "size") and hasattr(row.init_image, "mode") and hasattr(row.init_image, "convert")):
            raise bad("init_image", f"a {type(row.init_image).__name__} is not a PIL image: open the file with "
                      "PIL.Image.open(path)")
        if why := init_image_problem(row.init_image):
            raise bad("init_image", f"the image {why}")
    for name in ("width", "height"):
        value = getattr(row, name)
        if value is not None and not _whole(value):
            raise bad(name, f"{value!r} must be a whole number of pixels, or None for the default")
    try:
        resolve_sampler(row.sampler)
    except ValueError as e:
        raise bad("sampler", str(e)) from None
    width, height = resolve_size(row)
    for name, value in (("width", width), ("height", height)):
        if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
            source = (f" (the init image's size, {row.init_image.size[0]}x{row.init_image.size[1]}, rounded down; pass "
                      "width and height to resize it)") if getattr(row, name) is None and row.init_image is not None else ""
            raise bad(name, f"{value} must be a multiple of {SIZE_MULTIPLE} in {MIN_SIZE}..{MAX_SIZE}{source}")
    for name in SIZE_CONDITIONING:
        value, low = getattr(row, name), 0 if name.startswith("crop") else 1
        if value is not None and (not _whole(value) or not low <= value <= MAX_CONDITIONING_SIZE):
            raise bad(name, f"{value!r} must be an integer in {low}..{MAX_CONDITIONING_SIZE} (pixels), or empty "
                      f"for the default")
    if row.init_image is not None:
        if not _real(row.strength) or not 0 < row.strength <= 1:
            raise bad("strength", f"{row.strength!r} must be a number in (0, 1]")
        if img2img_steps(row.steps, row.strength) < 1:
            raise bad("strength", f"strength {row.strength} x {row.steps} steps leaves 0 denoising steps; "
                      f"raise strength or steps so that steps * strength >= 1")
