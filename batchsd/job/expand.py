"""Expansion: one manifest row -> the images it asks for, before any model loads, deterministically.

- `n_images` (default 1, at most MAX_N_IMAGES): the row becomes n rows with ids `<id>-<k>`, k from
  0, zero-padded to the width of n-1 (`cat-0` ... `cat-9`; `cat-00` ... `cat-99`), and seeds
  `seed + k`. Without a seed each gets the default seed of its own id (rows.seed_from_id). With
  n_images 1 (or empty) the row keeps its id.
- `seed` written as a range `100-199` (both ends included, the smaller first) does the same: one
  row per seed, k counting from the first. With both, `n_images` must be empty or equal to the
  range's length (anything else is a problem naming both); seed + n - 1 must stay below 2**63.
- Prompt templates (prompt_template.py): each resulting row draws its prompt from the template with
  its own id. The template is kept in the pass-through column `prompt_template` (for every row of
  a manifest where any prompt is a template). A manifest that already has a `prompt_template`
  column is an expanded one (`batchsd validate --expanded`): its prompts are used as written.
- Ids made by expansion are checked like any id: unique ignoring case across the whole job (a
  clash is a problem on the later data row) and at most rows.MAX_ID_LENGTH characters.

Each resulting row keeps the data row it came from (JobRow.source_row); problems name that row. The
result depends on the file only, so every shard (which filters the expanded ids), every resume and
every run sees the same rows, ids, seeds and prompts. `--limit N` takes the first N resulting rows.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from batchsd.job.prompt_template import SYNTAX_PATTERN, PromptTemplates, TemplateError, has_syntax
from batchsd.job.rows import MAX_ID_LENGTH, JobRow, Manifest, ManifestProblem, seed_from_id
from batchsd.model.request import SEED_LIMIT

N_IMAGES = "n_images"
TEMPLATE_COLUMN = "prompt_template"
MAX_N_IMAGES = 100_000
_RANGE_RE = re.compile(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*")


@dataclass(frozen=True, slots=True)
class SeedRange:
    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def parse_seed_range(v) -> SeedRange | None:
    """A seed cell written as a range `A-B`, or None when it is not one; ValueError for a bad range."""
    if not isinstance(v, str):
        return None
    m = _RANGE_RE.fullmatch(v)
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    if first > last:
        raise ValueError(f"seed range {v.strip()!r} runs backwards; write the smaller seed first ({last}-{first})")
    if last >= SEED_LIMIT:
        raise ValueError(f"seed range {v.strip()!r} ends above 2**63-1; keep both ends below {SEED_LIMIT}")
    if last - first + 1 > MAX_N_IMAGES:
        raise ValueError(f"seed range {v.strip()!r} makes {last - first + 1:,} images, more than {MAX_N_IMAGES:,} "
                         f"from one row; split it over several rows")
    return SeedRange(first, last)


def image_counts(counts: list, seeds: list, bad: dict[int, list[ManifestProblem]]) -> list[int]:
    """Images per data row from `n_images` (None: not given) and the seed (int, SeedRange or None);
    problems for a range that disagrees with n_images and for seeds that would pass 2**63-1."""
    out = []
    for i, (n, seed) in enumerate(zip(counts, seeds)):
        if isinstance(seed, SeedRange):
            if n is not None and n != seed.count:
                bad.setdefault(i, []).append(ManifestProblem(
                    i + 1, N_IMAGES, f"n_images is {n} but the seed range {seed} makes {seed.count} images; leave "
                    f"n_images empty (or {seed.count}), or write the range {seed.first}-{seed.first + n - 1}"))
            n = seed.count
        n = 1 if n is None else n
        if isinstance(seed, int) and seed + n - 1 >= SEED_LIMIT:
            bad.setdefault(i, []).append(ManifestProblem(
                i + 1, "seed", f"seed {seed} with n_images {n} would use seeds up to {seed + n - 1}, above 2**63-1; "
                f"use a seed of at most {SEED_LIMIT - n}"))
        out.append(n)
    return out


def compile_templates(prompts: list, templates: PromptTemplates | None, bad: dict[int, list[ManifestProblem]]
                      ) -> dict[int, tuple]:
    """{data row index: compiled template} for the prompts that are templates; problems for bad ones."""
    if templates is None:
        return {}
    compiled = {}
    for i, prompt in enumerate(prompts):
        if prompt is None or not has_syntax(prompt):
            continue
        try:
            compiled[i] = templates.compile(prompt)
        except TemplateError as e:
            bad.setdefault(i, []).append(ManifestProblem(i + 1, "prompt", str(e)))
    return compiled


def expand_rows(rows: list[JobRow], counts: list[int], seeded: list[bool], compiled: dict[int, tuple],
                templates: PromptTemplates | None) -> tuple[list[JobRow], dict[int, list[ManifestProblem]]]:
    """The job's rows from the valid data rows (`rows`, index = data row), and the problems found
    on the way (by data row index; those rows are left out). `seeded[i]`: the row gave a seed."""
    problems: dict[int, list[ManifestProblem]] = {}
    planned = []
    owner: dict[str, tuple[int, str]] = {}
    for r in rows:
        n = counts[r.index]
        width = len(str(n - 1))
        ids = [r.id] if n == 1 else [f"{r.id}-{k:0{width}d}" for k in range(n)]
        if len(ids[-1]) > MAX_ID_LENGTH:
            problems.setdefault(r.index, []).append(ManifestProblem(
                r.index + 1, "id", f"id {r.id!r} with {n} images makes ids like {ids[-1]!r}, longer than "
                f"{MAX_ID_LENGTH} characters; shorten the id"))
            continue
        for new_id in ids:
            j, first_id = owner.setdefault(new_id.lower(), (r.index, new_id))
            if j != r.index:
                this = f"id {new_id!r}" if new_id == r.id else f"id {new_id!r} (made from id {r.id!r})"
                problems.setdefault(r.index, []).append(ManifestProblem(
                    r.index + 1, "id", f"{this} is also the id of an image of data row {j + 1} ({first_id!r}); ids "
                    "must be unique, ignoring case, because they name the output files: change one of the ids"))
                break
        planned.append((r, ids))
    use_template_column = bool(compiled)
    out: list[JobRow] = []
    for r, ids in planned:
        if r.index in problems:
            continue
        nodes = compiled.get(r.index)
        prompts = [r.prompt] * len(ids) if nodes is None else [templates.render(nodes, new_id) for new_id in ids]
        empty = next((new_id for new_id, p in zip(ids, prompts) if not p.strip()), None)
        if empty is not None:
            problems.setdefault(r.index, []).append(ManifestProblem(
                r.index + 1, "prompt", f"the prompt drawn for id {empty!r} is empty; give every alternative some text"))
            continue
        extra = {TEMPLATE_COLUMN: r.prompt, **r.extra} if use_template_column else r.extra
        if len(ids) == 1 and nodes is None and not use_template_column:
            out.append(replace(r, index=len(out), source_row=r.index))
            continue
        for k, (new_id, prompt) in enumerate(zip(ids, prompts)):
            seed = r.seed + k if seeded[r.index] else (r.seed if new_id == r.id else seed_from_id(new_id))
            out.append(replace(r, index=len(out), id=new_id, prompt=prompt, seed=seed, extra=extra,
                               source_row=r.index))
    return out, problems


def expanded_extras(extra_values: pa.Table, rows: list[JobRow], with_template: bool) -> pa.Table:
    """The pass-through values of the job's rows (one per row, types kept): each row's data row's,
    with `prompt_template` first when prompts were templates."""
    templates = pa.array([r.extra[TEMPLATE_COLUMN] for r in rows] if with_template else [], pa.string())
    if extra_values.num_columns == 0:        # a table without columns has no rows to take
        return pa.table({TEMPLATE_COLUMN: templates}) if with_template else extra_values
    values = extra_values.take(pa.array([r.source_row for r in rows], pa.int64()))
    return values.add_column(0, TEMPLATE_COLUMN, templates) if with_template else values


def may_hold_templates(prompts) -> bool:
    """Whether any prompt of an Arrow column may be a template (has_syntax's characters; one pass in
    Arrow, so manifests without templates pay no Python call per row). Non-text columns: True (their
    cells are checked one by one)."""
    import pyarrow.compute as pc

    if not (pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type)):
        return True
    return bool(pc.any(pc.match_substring_regex(prompts, SYNTAX_PATTERN)).as_py())


def needs_expansion(counts: list, seeds: list, templates: PromptTemplates | None) -> bool:
    """Whether any row asks for more than one image or the prompts may be templates (else the rows
    stay as read)."""
    return (templates is not None or any(n not in (None, 1) for n in counts)
            or any(isinstance(s, SeedRange) for s in seeds))


# ----------------------------------------------------------------------------- validate --expanded

def expanded_table(manifest: Manifest, out_path: Path) -> pa.Table:
    """The job's rows as a manifest: every row one image, defaults and seeds resolved, the chosen
    prompt in `prompt` (and the template in `prompt_template`), a `model` column when rows name
    their own, pass-through columns with their types. `batchsd run` makes the same images from it as from `manifest`. An init image is written
    as given when `out_path` is in the manifest's folder, else as an absolute path."""
    from batchsd.job.loras import column_loras, lora_record
    from batchsd.job.schema import MANIFEST_FIELDS

    same_folder = os.path.abspath(Path(out_path).parent) == os.path.abspath(Path(manifest.path).parent)
    records = []
    for r in manifest.rows:
        record = r.to_record()
        record["loras"] = lora_record(column_loras(r))   # the prompt's tags stay in the prompt, read again
        if r.init_image is not None and not same_folder:
            record["init_image"] = r.init_image
        records.append(record)
    arrays = [pa.array([rec[f.name] for rec in records], f.type) for f in MANIFEST_FIELDS]
    names = [f.name for f in MANIFEST_FIELDS]
    if any(r.model for r in manifest.rows):   # a row's own model, as its model_key (absolute or "tiny")
        arrays.append(pa.array([r.model for r in manifest.rows], pa.string()))
        names.append("model")
    extras = manifest.extras
    for name in extras.column_names:
        if name != "id":
            arrays.append(extras.column(name))
            names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def write_expanded(manifest: Manifest, out_path: Path) -> None:
    """`expanded_table` as Parquet at `out_path`, written to a temporary name and renamed."""
    import pyarrow.parquet as pq

    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(expanded_table(manifest, out_path), tmp)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
