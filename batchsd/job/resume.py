"""Resume: the one rule that says whether a row is done, to make, or an earlier failure.

`batchsd run` (which rows to make), its dry run (which it would make) and `batchsd status` (ok /
missing / failed) all ask `row_states`. Given a row and its latest journaled record, a row is

    done     its record is "ok", for the row's current params_hash, made by the row's model (its
             `model` cell's, else the run's: RowModels; by sha256, or the name for the tiny random model) with the same numerics (`Numerics`: torch
             version, device type, dtype, exact mode), and its image (and latents with
             --save-latents) are files in the output folder
    failed   its record is an error for the current params, model and numerics (made again with
             --retry-errors)
    make     anything else: no record, other params, another model or numerics, files gone (with
             --verify also: an image whose bytes are not the recorded image_sha256); or --overwrite

A model or numerics that are not known (a dry run before loading, a status without run metadata)
are not compared, nor are the numerics of a record that carries none (written before they were
recorded, or a row that failed before any model call). Rows are deterministic (a CPU generator
per row, README "Seeding contract"); in exact mode (model/fast/exact.py) a resumed run's rows are
bit-identical to an uninterrupted run's, otherwise equal up to the floating-point rounding of
another batch composition (within 1/255 per pixel; the tests check both).

Rows of a run whose latest record is in another journal of the folder (an earlier unsharded run,
or shards: layout.RunLayout) are skipped and their records copied into the run's own journal
(`adopt_records`), so its results file covers all its rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from batchsd.job.journal import Journal, PriorRecord, latest_records
from batchsd.job.present import existing_files, file_sha256
from batchsd.job.rows import JobRow

DONE, MAKE, FAILED = "done", "make", "failed"


@dataclass(frozen=True)
class ModelIdentity:
    """What resume compares: a checkpoint by its sha256; the tiny random model (no file) by name."""
    name: str
    sha256: str | None
    # how it is read ("epsilon" | "v_prediction": the file's, its yaml's or --prediction-type); compared
    # as part of the Numerics, here so that a driver can plan them before loading (model_choice)
    prediction_type: str | None = None

    @classmethod
    def of(cls, pipe) -> "ModelIdentity":
        """A loaded Pipeline's."""
        return cls(pipe.name, pipe.sha256, pipe.family.scheduler.prediction_type)

    def made(self, rec: PriorRecord) -> bool:
        if self.sha256:
            return rec.model_sha256 == self.sha256
        return rec.model == self.name and not rec.model_sha256


@dataclass(frozen=True)
class Numerics:
    """What a row's bits depend on besides the row and the model: recorded with every result (the
    NUMERICS_COLUMNS of schema.py) and in run.json. A change of any of them makes a row again, as a
    model change does; in exact mode they (with the row and the model) fix the row's bytes."""
    torch_version: str
    device_type: str        # "cpu" | "cuda": not the CPU or GPU model, whose kernels also differ
    dtype: str              # "float32" | "bfloat16" | "float16"
    exact: bool
    # the model's prediction type as this run reads it: a single SD 2.x file says none, so its yaml or
    # --prediction-type decides, and another choice makes other images from the same file
    prediction_type: str | None = None

    @classmethod
    def of(cls, pipe) -> "Numerics":
        """Those of a loaded Pipeline, in this process's torch."""
        import torch

        return cls(torch.__version__, pipe.device.type, str(pipe.dtype).removeprefix("torch."), bool(pipe.exact),
                   pipe.family.scheduler.prediction_type)

    @classmethod
    def planned(cls, device_type: str, dtype: str, exact: bool | None, compile: str | None = None,
                prediction_type: str | None = None) -> "Numerics":
        """Those a Pipeline.load(device=<device_type>, dtype=dtype, exact=exact, compile=compile) of a
        model read with `prediction_type` in this environment will have (the Ray driver plans with
        them before its actors load)."""
        import torch

        from batchsd.model.devices import resolve_dtype
        from batchsd.model.fast.exact import resolve_exact

        dt = resolve_dtype(dtype, torch.device(device_type))
        return cls(torch.__version__, device_type, str(dt).removeprefix("torch."),
                   resolve_exact(exact, device_type, compile), prediction_type)

    def columns(self) -> dict:
        return {"torch_version": self.torch_version, "device_type": self.device_type, "dtype": self.dtype,
                "exact": self.exact, "prediction_type": self.prediction_type}

    def made(self, rec: PriorRecord) -> bool:
        """Whether `rec` was made with these numerics; a record that carries none is not compared, nor
        a prediction type that one does not carry (rows from before it was recorded)."""
        if rec.torch_version is None:
            return True
        if None not in (rec.prediction_type, self.prediction_type) and rec.prediction_type != self.prediction_type:
            return False
        return (rec.torch_version, rec.device_type, rec.dtype, rec.exact) == \
            (self.torch_version, self.device_type, self.dtype, self.exact)

    def __str__(self) -> str:
        return (f"torch {self.torch_version}, {self.device_type}, {self.dtype}, "
                f"exact mode {'on' if self.exact else 'off'}"
                + (f", {self.prediction_type}" if self.prediction_type else ""))


@dataclass(frozen=True)
class RowModels:
    """The model and numerics each row is made with: what resume compares a row's record with.

    A row with a `model` cell (JobRow.model: a checkpoint path or "tiny") is made by that model; a
    row without one by the run's model (`default_key`). Keys are what Pipeline.load is given. A row
    whose key is not in `by_key` (a dry run that resolved no model, a status of a model the run did
    not record) and a None in a pair compare nothing."""
    by_key: dict[str | None, tuple[ModelIdentity | None, Numerics | None]]
    default_key: str | None = None

    @classmethod
    def one(cls, model: ModelIdentity | None, numerics: Numerics | None = None) -> "RowModels":
        """Every row without a `model` cell made by `model` with `numerics`."""
        return cls({None: (model, numerics)})

    def key(self, row: JobRow) -> str | None:
        return row.model or self.default_key

    def of(self, row: JobRow) -> tuple[ModelIdentity | None, Numerics | None]:
        return self.by_key.get(self.key(row), (None, None))

    def model(self, row: JobRow) -> ModelIdentity | None:
        return self.of(row)[0]

    def models_only(self) -> "RowModels":
        """The same models with no numerics compared (a job's merged table: shards may run on other
        devices or dtypes; each record carries its own numerics)."""
        return RowModels({key: (model, None) for key, (model, _) in self.by_key.items()}, self.default_key)

    def keys_in_order(self, rows: Sequence[JobRow]) -> list[str | None]:
        """The keys `rows` use, in order of first use."""
        return list(dict.fromkeys(self.key(r) for r in rows))


def loaded_mismatch(pipe, model: ModelIdentity, numerics: Numerics) -> str | None:
    """Why a loaded Pipeline is not the model, or lacks the numerics, that a run planned its resume
    decision with; None when it matches. Each engine checks every model it loads (run.py, Ray's
    RowMaker)."""
    if (pipe.name, pipe.sha256) != (model.name, model.sha256):
        return (f"the model loaded is {pipe.name} ({pipe.sha256}), but the run was planned for {model.name} "
                f"({model.sha256})")
    here = Numerics.of(pipe)
    if here != numerics:
        return f"the model loaded makes rows with {here}, but the run was planned for {numerics}"
    return None


def row_states(rows: Sequence[JobRow], prior: dict[str, PriorRecord], out_dir: Path, *,
               made_with: RowModels | None, save_latents: bool = False, overwrite: bool = False,
               retry_errors: bool = False, verify: bool = False) -> list[str]:
    """DONE, MAKE or FAILED for each row (module docstring); files are looked up in one pass.
    `made_with` None compares no model nor numerics. `verify`: a row is DONE only if its image file's
    sha256 is the one its record holds (a file damaged or edited since is made again); reads every
    done row's image."""
    made_with = made_with or RowModels({})
    states = [_state(row, prior.get(row.id), *made_with.of(row), save_latents, overwrite, retry_errors)
              for row in rows]
    present = existing_files(out_dir, [f for s in states if isinstance(s, list) for f in s if f])
    states = [(DONE if all(f and f in present for f in s) else MAKE) if isinstance(s, list) else s for s in states]
    if verify:
        states = [MAKE if state == DONE and not _image_verified(out_dir, prior[row.id]) else state
                  for row, state in zip(rows, states)]
    return states


def _image_verified(out_dir: Path, rec: PriorRecord) -> bool:
    if not rec.image_sha256 or not rec.image_path:
        return False
    try:
        return file_sha256(out_dir / rec.image_path) == rec.image_sha256
    except OSError:
        return False


def decide(rows: Sequence[JobRow], prior: dict, out_dir: Path, *, made_with: RowModels, save_latents: bool,
           overwrite: bool, retry_errors: bool, verify: bool = False) -> tuple[list[JobRow], int, int]:
    """Split rows into (to make, skipped ok, skipped earlier failures)."""
    states = row_states(rows, prior, out_dir, made_with=made_with, save_latents=save_latents, overwrite=overwrite,
                        retry_errors=retry_errors, verify=verify)
    todo = [row for row, state in zip(rows, states) if state == MAKE]
    return todo, states.count(DONE), states.count(FAILED)


def _state(row: JobRow, rec: PriorRecord | None, model: ModelIdentity | None, numerics: Numerics | None,
           save_latents: bool, overwrite: bool, retry_errors: bool) -> str | list:
    """MAKE, FAILED, or for an ok record of the current params and model the files (relative to
    out_dir; None where the record names none) it needs to count as DONE."""
    if overwrite or rec is None or rec.params_hash != row.params_hash():
        return MAKE
    if model is not None and not model.made(rec):
        return MAKE
    if numerics is not None and not numerics.made(rec):
        return MAKE
    if rec.status == "ok":
        return [rec.image_path] + ([rec.latents_path] if save_latents else [])
    return MAKE if retry_errors else FAILED


def adopt_records(journal: Journal, rows: Sequence[JobRow], todo: Sequence[JobRow], prior: dict) -> int:
    """Copy into `journal` the records of rows it will not make whose latest record is in another
    journal of the folder (made by an unsharded run, or by shards), so that this run's results
    file covers all its rows. Returns how many were copied."""
    todo_ids = {r.id for r in todo}
    own = str(journal.parts_dir)
    by_journal: dict[str, list[str]] = {}
    for r in rows:
        rec = prior.get(r.id)
        if r.id not in todo_ids and rec is not None and rec.parts_dir and rec.parts_dir != own:
            by_journal.setdefault(rec.parts_dir, []).append(r.id)
    n = 0
    for parts_dir, ids in by_journal.items():
        table = latest_records(Path(parts_dir), journal.schema, ids)
        journal.append_table(table)
        n += table.num_rows
    return n
