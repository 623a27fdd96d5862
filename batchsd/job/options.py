"""What a run is asked (RunOptions) and what it reports (RunSummary, exit codes); the errors that
stop a run before anything was made (UsageError, ManifestInvalid: exit 2).

Exit status: 0 every row of the job is ok; 1 some rows failed (recorded in results.parquet, also
rows that failed in an earlier run and were not retried); 2 usage, model or manifest errors
(nothing run); 3 stopped by an error outside the rows (disk full, an unwritable folder): finished
rows are kept and the same command resumes; 130/143 interrupted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from batchsd.errors import InputError
from batchsd.job.outputs.spec import OutputSpec
from batchsd.job.rows import Manifest, ManifestOptions
from batchsd.job.shards import ShardSpec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
EXIT_STOPPED = 3   # stopped by an error outside the rows (disk full, ...): finished rows kept, run again


class UsageError(InputError):
    """Bad arguments, a model that cannot be found or loaded: nothing was run (exit 2)."""


class ManifestInvalid(UsageError):
    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        super().__init__(manifest.format_problems())


@dataclass(frozen=True)
class RunOptions:
    manifest: Path
    model: str | None = None
    out_dir: Path | None = None
    batch_size: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    save_latents: bool = False
    limit: int | None = None
    dry_run: bool = False
    overwrite: bool = False
    retry_errors: bool = False
    verify: bool = False             # a done row's image must hash to its recorded image_sha256 (resume.row_states)
    low_memory: bool | None = None         # None: devices.default_low_memory
    compile: str | None = None       # torch.compile mode for the UNet (COMPILE_MODES in model/fast), None: eager
    winograd: bool | None = None     # CPU Winograd convolutions (winograd.py); None: the Pipeline's default
    fused_attention: bool | None = None  # CPU bf16 fused attention (fused_attention.py); None: the Pipeline's default
    fused_epilogues: bool | None = None  # CPU fused linear epilogues (fused_epilogues.py); None: the Pipeline's default
    shard: ShardSpec | None = None   # make only this shard's rows (shards.py); None or count 1: all rows
    prediction_type: str | None = None  # what the UNet predicts when the checkpoint does not say (SD 2.x)
    reuse_out: bool = False          # let --out hold this job though it holds another manifest's
    exact: bool | None = None        # exact mode (model/fast/exact.py); None: the device's default (on for the CPU)
    manifest_options: ManifestOptions = ManifestOptions()  # --map, --wildcards (rows.ManifestOptions)
    output: OutputSpec = OutputSpec()  # --format, --image-format, --quality, --shard-size, --captions (outputs/spec.py)


@dataclass
class RunSummary:
    out_dir: Path
    total: int = 0              # rows in this job (after --limit)
    beyond_limit: int = 0       # manifest rows --limit left out of the job: the manifest is not done
    ok: int = 0                 # made ok in this run
    failed: int = 0             # failed in this run
    skipped: int = 0            # already done (ok) before this run
    previously_failed: int = 0  # error rows from an earlier run, not retried
    pending: int = 0            # left undone (interrupted)
    elapsed_s: float = 0.0
    interrupted_by: str | None = None
    model: str | None = None
    model_sha256: str | None = None      # the run's one model (None for both when rows use several)
    models: list = field(default_factory=list)   # every model the rows use: {"name", "sha256"}, first use first
    batch_size: int | None = None
    dry_run: bool = False
    shard: ShardSpec | None = None
    results_path: Path | None = None     # this run's results file (a shard's part, or results.parquet)
    merged: bool = False                 # a shard that completed the whole job wrote results.parquet
    compile_s: float = 0.0               # --compile: seconds spent compiling the UNet (first call per shape)
    winograd: bool = False               # the wide CPU convolutions ran as Winograd (--winograd; rounding differs)
    fused_attention: bool = False        # the UNet's attention ran the fused bf16 kernel (--attention; rounding differs)
    fused_epilogues: bool = False        # GEGLU, residual adds in oneDNN linears (fused_epilogues.py; rounding differs)
    cpu: str | None = None               # the CPU's kind the speed choices were keyed on (devices.cpu_kind)
    mkl_strict: bool | None = None       # MKL's strict reproducible mode was on (fast/exact.mkl_strict; None: no MKL)
    images_dir: Path | None = None       # where the images went (--format's folder; None: images/)

    @property
    def images_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted_by == "SIGINT":
            return EXIT_SIGINT
        if self.interrupted_by is not None:
            return EXIT_SIGTERM
        return EXIT_FAILED if (self.failed or self.previously_failed) else EXIT_OK



def summary_record(opts: RunOptions, s: RunSummary) -> dict:
    """summary.json: the done marker's content."""
    from batchsd.job.schema import now_utc

    return {
        # complete: every row of the manifest (of this shard) was processed; not after --limit left rows out
        "complete": s.interrupted_by is None and not s.beyond_limit, "limit": opts.limit,
        "beyond_limit": s.beyond_limit, "manifest": str(opts.manifest), "out_dir": str(s.out_dir),
        "results": str(s.results_path), "model": s.model, "model_sha256": s.model_sha256,
        "models": s.models,
        "shard_index": s.shard.index if s.shard else None, "shard_count": s.shard.count if s.shard else 1,
        "rows": s.total, "ok": s.ok, "failed": s.failed, "skipped": s.skipped,
        "previously_failed": s.previously_failed, "pending": s.pending, "batch_size": s.batch_size,
        "elapsed_s": round(s.elapsed_s, 3), "images_per_s": round(s.images_per_s, 4),
        "compile_s": round(s.compile_s, 3), "winograd": s.winograd,
        "fused_attention": s.fused_attention, "fused_epilogues": s.fused_epilogues, "cpu": s.cpu,
        "mkl_strict": s.mkl_strict,
        "finished_at": now_utc().isoformat(), "exit_code": s.exit_code,
    }
