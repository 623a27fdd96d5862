"""Columns as other tools name them: `--map` renames, and warnings for columns that look like a
parameter but would be passed through unused.

`--map step=steps,cfg=cfg_scale,sampler=sampler` renames manifest columns before anything else
reads them (DiffusionDB's `step`/`cfg`, a dataset's `caption`, ...). Each SOURCE must be a column
of the file, each TARGET a column batchsd reads (manifest.COLUMNS); no two sources may take one
target, and a target may not be a column the file already has unless that column is itself renamed
away. `a=a` is allowed and changes nothing.

A pass-through column whose name is another tool's name for a parameter (`step`, `cfg`,
`guidance_scale`, `negative`, `num_inference_steps`, `sampler_name`, ...) or a near miss of a
column's name (`widht`, `heigth`) gets a warning naming the column it probably means: its values do
not set that parameter, and without the warning the job would silently run the defaults.
"""
from __future__ import annotations

import difflib
import re
from typing import Sequence

import pyarrow as pa

from batchsd.errors import InputError
from batchsd.job.rows import ManifestProblem

# other tools' names for batchsd's columns (compared after `normalized`): DiffusionDB, diffusers,
# A1111 (API and scripts), InvokeAI, ComfyUI exports
LOOKALIKES = {
    "steps": ("step", "num_inference_steps", "num_steps", "ddim_steps", "sampling_steps", "n_steps"),
    "cfg_scale": ("cfg", "guidance_scale", "guidance", "scale", "cfg_guidance", "cfgscale_value"),
    "negative_prompt": ("negative", "neg_prompt", "neg", "negative_prompts", "uc", "negative_text"),
    "sampler": ("sampler_name", "scheduler", "sampling_method", "sampler_index", "samplers"),
    "seed": ("seeds", "noise_seed", "random_seed"),
    "width": ("w", "image_width", "img_width"),
    "height": ("h", "image_height", "img_height"),
    "strength": ("denoising_strength", "denoise", "denoising", "image_strength"),
    "init_image": ("init_img", "init_image_path", "input_image", "source_image"),
    "n_images": ("num_images", "num_images_per_prompt", "n_iter", "batch_count", "n_samples", "images_per_prompt"),
    "prompt": ("caption", "text", "positive_prompt", "prompts"),
}
_TYPO_CUTOFF = 0.8   # difflib ratio for a near miss of a column name ("widht" -> "width")


def normalized(name: str) -> str:
    """A column name compared loosely: without spaces, '_' or '-', lower case."""
    return re.sub(r"[\s_\-]+", "", name).lower()


_LOOKALIKE_OF = {normalized(alias): column for column, aliases in LOOKALIKES.items() for alias in aliases}


def parse_column_map(text: str | None) -> tuple[tuple[str, str], ...]:
    """`step=steps,cfg=cfg_scale` -> (("step", "steps"), ("cfg", "cfg_scale")); InputError for bad syntax
    or a source given twice. Whether the names fit the file is checked by `apply_column_map`."""
    if text is None or not text.strip():
        return ()
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        source, eq, target = item.partition("=")
        source, target = source.strip(), target.strip()
        if not eq or not source or not target:
            raise InputError(f"--map {text!r}: {item.strip()!r} is not SOURCE=TARGET; write e.g. "
                             "--map step=steps,cfg=cfg_scale")
        if any(source == s for s, _ in pairs):
            raise InputError(f"--map {text!r}: column {source!r} is renamed twice; keep one {source}=...")
        pairs.append((source, target))
    return tuple(pairs)


def apply_column_map(table: pa.Table, column_map: Sequence[tuple[str, str]], known: Sequence[str]
                     ) -> tuple[pa.Table, list[ManifestProblem]]:
    """`table` with its columns renamed, or the problems (file-level, naming the fix) and `table`
    unchanged. `known`: the columns a target may be."""
    if not column_map:
        return table, []
    names = list(table.column_names)
    renamed = dict(column_map)
    problems: list[ManifestProblem] = []
    for source, target in column_map:
        if source not in names:
            near = difflib.get_close_matches(source, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(ManifestProblem(None, source, f"--map {source}={target}: the manifest has no column "
                                            f"{source!r}{hint}; its columns: {', '.join(map(repr, names))}"))
        if target not in known:
            near = difflib.get_close_matches(target, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(ManifestProblem(None, source, f"--map {source}={target}: {target!r} is not a column "
                                            f"batchsd reads{hint}; targets: {', '.join(known)}"))
    takers: dict[str, str] = {}
    for source, target in column_map:
        if target in takers:
            problems.append(ManifestProblem(None, source, f"--map {takers[target]}={target} and {source}={target} "
                                            f"both rename to {target!r}; keep one"))
        takers.setdefault(target, source)
        if target in names and target != source and target not in renamed:
            problems.append(ManifestProblem(None, source, f"--map {source}={target}: the manifest already has a "
                                            f"column {target!r}; drop this rename, or rename that column in the "
                                            "file (--map may also swap two columns batchsd reads: a=b,b=a)"))
    if problems:
        return table, problems
    return table.rename_columns([renamed.get(name, name) for name in names]), []


def lookalike_warnings(extra_columns: Sequence[str], columns: Sequence[str], known: Sequence[str]
                       ) -> list[ManifestProblem]:
    """A warning for each pass-through column that looks like a parameter the manifest does not set
    (`columns`: the manifest's columns after renames; `known`: the columns batchsd reads)."""
    warnings = []
    for name in extra_columns:
        target = _LOOKALIKE_OF.get(normalized(name))
        how = "another tool's name for it"
        if target is None:
            near = difflib.get_close_matches(name.lower(), known, n=1, cutoff=_TYPO_CUTOFF)
            target, how = (near[0], "a near miss of its name") if near else (None, "")
        if target is None or target in columns:
            continue
        # --map trims the names it is given, so a name with spaces around it is renamed in the file only
        rename = "in the file (remove the spaces around the name)" if name != name.strip() else \
            f"(--map {name}={target}, or in the file)"
        warnings.append(ManifestProblem(None, name, f"is passed through unused, but looks like {target!r} ({how}); "
                                        f"its values do not set {target}: if that is what it means, rename it "
                                        f"{rename}"))
    return warnings
