"""The `batchsd` command line: run, validate, inspect, status.

    batchsd run MANIFEST [--model PATH|tiny] [--out DIR] [--batch-size N] [--device auto|cpu|cuda[:N]]
                         [--dtype auto|fp32|fp16|bf16] [--save-latents] [--limit N] [--dry-run]
                         [--overwrite] [--retry-errors] [--[no-]low-memory] [--compile MODE] [--winograd auto|on|off]
                         [--attention auto|fused|torch] [--epilogues auto|fused|torch]
                         [--shard I/N] [--shard-count N] [--engine local|ray] [--workers K]
                         [--format files|webdataset|parquet|imagefolder] [--image-format png|jpg|webp]
                         [--quality Q] [--shard-size N] [--captions]
                         [--map SOURCE=TARGET,...] [--wildcards DIR] [--prompt-syntax plain|a1111] [--lora-dir DIR]
                         [--embeddings-dir DIR]
                         [--prediction-type epsilon|v_prediction] [--exact/--no-exact] [--reuse-out]
    batchsd validate MANIFEST [--batch-size N] [--map SOURCE=TARGET,...] [--wildcards DIR]
                              [--prompt-syntax plain|a1111] [--lora-dir DIR] [--embeddings-dir DIR]
                              [--expanded OUT.parquet]
    batchsd inspect MODEL [--json]
    batchsd status OUT [--manifest MANIFEST] [--json]

Shards (scale/launchers.py): --shard I/N, else the launcher's environment (SLURM array, srun, torchrun,
Kubernetes Indexed Job); the source used is printed. --engine ray (scale/ray_engine.py) imports Ray
only when asked for.

Exit status: 0 all rows ok; 1 some rows failed (recorded in results.parquet); 2 usage, model or
manifest error (nothing run); 130/143 stopped by SIGINT/SIGTERM (resume by running the same
command again). Input errors are reported as messages, never as tracebacks.

Progress and log lines go to stderr; the final summary, the validate report and inspect's
output go to stdout.
"""
from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from batchsd.job.outputs.spec import DEFAULT_SHARD_SIZE, FORMATS, IMAGE_FORMATS
from batchsd.model.prompt_syntax import PROMPT_SYNTAXES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Stable Diffusion (SD 1.x, 2.x, SDXL) batch jobs: a manifest in, images and results.parquet out.")


class Winograd(str, enum.Enum):
    auto = "auto"
    on = "on"
    off = "off"


class FusedOrTorch(str, enum.Enum):
    """--attention and --epilogues: batchsd's fused CPU path, torch's ops, or the CPU kind's default."""
    auto = "auto"
    fused = "fused"
    torch = "torch"

    @property
    def asked(self) -> bool | None:
        return {"auto": None, "fused": True, "torch": False}[self.value]


class Compile(str, enum.Enum):
    none = "none"
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"


class PredictionType(str, enum.Enum):
    epsilon = "epsilon"
    v_prediction = "v_prediction"


def _choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """A typer choice type over names whose one home is elsewhere."""
    return enum.Enum(name, {v: v for v in values}, type=str)


PromptSyntax = _choices("PromptSyntax", PROMPT_SYNTAXES)
OutputFormat = _choices("OutputFormat", FORMATS)
ImageFormat = _choices("ImageFormat", IMAGE_FORMATS)


class Engine(str, enum.Enum):
    local = "local"
    ray = "ray"


class DType(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def _check_out(value: Optional[str]) -> Optional[str]:
    """An empty --out (an unset variable in `--out "$OUT"`) would mean the working folder: refused."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty; give the output folder (--out . for the working folder)")
    return value


def _check_device(value: str) -> str:
    """Checked when parsed (also for --dry-run): unknown names, cuda without CUDA, a missing cuda:N."""
    from batchsd.model.devices import resolve_device
    from batchsd.errors import InputError

    try:
        resolve_device(value)
    except InputError as e:
        raise typer.BadParameter(str(e)) from None
    return value


def _column_map(value: Optional[str]) -> Optional[str]:
    """--map is checked when parsed: SOURCE=TARGET pairs (whether they fit the file: the manifest's problems)."""
    from batchsd.errors import InputError
    from batchsd.job.column_map import parse_column_map

    try:
        parse_column_map(value)
    except InputError as e:
        raise typer.BadParameter(str(e)) from None
    return value


# The options that say how a manifest is read, the same for run and validate (one definition each).
MODEL_OPTION = typer.Option(
    None, "--model", "-m",
    help="Checkpoint file or diffusers folder, or 'tiny' (random weights, noise images), for the rows without a "
         "model cell (a manifest's model column names a row's own: README 'Per-row models'). Default: "
         "$BATCHSD_MODEL, else the one checkpoint in ./weights/.")
MAP_OPTION = typer.Option(
    None, "--map", metavar="SOURCE=TARGET,...", callback=_column_map,
    help="Rename manifest columns before reading them, e.g. DiffusionDB's: --map step=steps,cfg=cfg_scale. "
         "Each target is a column batchsd reads (README 'Manifest').")
WILDCARDS_OPTION = typer.Option(
    None, "--wildcards", metavar="DIR", exists=True, file_okay=False, dir_okay=True,
    help="Folder of wildcard files: __name__ in a prompt is one line of DIR/name.txt, drawn per row from its id "
         "(prompt templates: README 'Expansion').")
PROMPT_SYNTAX_OPTION = typer.Option(
    PromptSyntax.plain, "--prompt-syntax", case_sensitive=False,
    help="How prompts are read where the manifest has no prompt_syntax cell: plain (as written, cut at 77 "
         "tokens: diffusers' reading) or a1111 ((word:1.2) emphasis, BREAK, prompts of any length in "
         "75-token chunks: README 'Prompt syntax').")
LORA_DIR_OPTION = typer.Option(
    None, "--lora-dir", metavar="DIR", file_okay=False,
    help="Folder of LoRA files: a name in the loras column or a <lora:name:0.8> tag is "
         "DIR/**/name.safetensors (or .pt, .ckpt, .bin). Default: weights/lora.")
EMBEDDINGS_DIR_OPTION = typer.Option(
    None, "--embeddings-dir", metavar="DIR", file_okay=False,
    help="Folder of textual-inversion embeddings (.pt, .safetensors, .bin): every one is active, and a prompt "
         "that names a file's stem uses its vectors (README 'Prompt syntax'). Default: weights/embeddings.")


PREDICTION_TYPE_OPTION = typer.Option(
    None, "--prediction-type", case_sensitive=False,
    help="What the UNet predicts, for SD 2.x single files that do not say (no <name>.yaml beside them): "
         "epsilon (2.x-base, 512) or v_prediction (2.x 768-v). Overrides the yaml or folder config; applies to "
         "every model of the run (--model and the manifest's model column).")


def _manifest_options(column_map: Optional[str], wildcards: Optional[Path], prompt_syntax: "PromptSyntax",
                      lora_dir: Optional[Path] = None, embeddings_dir: Optional[Path] = None):
    """The options a manifest is read with; what it needs from the models (sizes, families,
    --prediction-type) is added by model_choice.with_model_defaults."""
    from batchsd.job.column_map import parse_column_map
    from batchsd.job.rows import ManifestOptions

    return ManifestOptions(parse_column_map(column_map), wildcards, prompt_syntax.value, lora_dir=lora_dir,
                           embeddings_dir=embeddings_dir)


def _err_console() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False, emoji=False)


def _out_console() -> Console:
    return Console(soft_wrap=True, highlight=False, emoji=False)


def _fail(console: Console, message: str, code: int) -> "typer.Exit":
    console.print(f"[bold red]error:[/bold red] {escape(message)}")
    return typer.Exit(code)


@app.command()
def run(
    manifest: Path = typer.Argument(..., help="Job manifest (.csv, .parquet, .txt or .jsonl), a row per image "
                                              "or per n_images."),
    model: Optional[str] = MODEL_OPTION,
    out: Optional[str] = typer.Option(None, "--out", "-o", callback=_check_out,
                                      help="Output folder. Default: outputs/<manifest name>/."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1,
                                             help="Rows per batch. Default: 4 on the CPU; on CUDA chosen from free "
                                                  "memory and image size."),
    device: str = typer.Option("auto", "--device", callback=_check_device, help="auto, cpu, cuda or cuda:N."),
    dtype: DType = typer.Option(DType.auto, "--dtype", case_sensitive=False,
                                help="auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16 or bf16."),
    save_latents: bool = typer.Option(False, "--save-latents", help="Also write latents/<id>.npy (float32, before VAE decoding)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Only the first N rows of the manifest."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the batch plan; load no model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Make every row again, even those already done."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Make rows that failed in an earlier run again."),
    verify: bool = typer.Option(False, "--verify", help="Hash each done row's image and make it again when the "
                                "bytes are not those its result recorded (a damaged or edited file). Reads every "
                                "done image; loose-file formats only."),
    low_memory: Optional[bool] = typer.Option(
        None, "--low-memory/--no-low-memory", show_default="on for the CPU, off on CUDA",
        help="CPU (a checkpoint file or folder): never hold the text encoders and the UNet together; each is "
             "read again from the checkpoint when the job switches between encoding prompts and denoising "
             "(the same images). CUDA: keep idle model parts in CPU memory."),
    compile: Compile = typer.Option(Compile.none, "--compile", case_sensitive=False,
                                    help="torch.compile the UNet: default, reduce-overhead (CUDA graphs on CUDA) "
                                         "or max-autotune. Compiles once per image size (minutes); the time is "
                                         "reported. Meant for long CUDA jobs; no gain on the CPU (docs/performance.md)."),
    winograd: Winograd = typer.Option(Winograd.auto, "--winograd", case_sensitive=False,
                                      help="CPU: the wide 3x3 convolutions by Winograd F(2x2,3x3): fewer multiply-adds "
                                           "for a transformed copy of their weights (16/9 of their size). auto: on for "
                                           "bf16/fp16 on CPUs without AMX, off with AMX and for fp32 (keyed on the "
                                           "CPU's kind, recorded in summary.json). Figures: docs/performance.md."),
    attention: FusedOrTorch = typer.Option(FusedOrTorch.auto, "--attention", case_sensitive=False,
                                        help="CPU, bf16: the UNet's attention by batchsd's fused kernel (compiled once "
                                             "per machine with the C++ compiler, $CXX or g++) or by torch's. auto: "
                                             "fused on CPUs with avx512-bf16 (a tile kernel where they have AMX), torch's elsewhere or when "
                                             "the kernel cannot be built (a warning says why). Rounding differs "
                                             "between the two; recorded in the results and summary.json."),
    epilogues: FusedOrTorch = typer.Option(FusedOrTorch.auto, "--epilogues", case_sensitive=False,
                                        help="CPU: the UNet transformers' GEGLU and residual adds in the epilogues of "
                                             "oneDNN linears (fused) or as torch's separate ops. auto: fused for bf16 "
                                             "on CPUs with AMX, torch's elsewhere (keyed on the CPU's kind). Rounding "
                                             "differs between the two; recorded in the results and summary.json."),
    exact: Optional[bool] = typer.Option(None, "--exact/--no-exact",
                                         help="Exact mode: a row's image and latents are the same bytes whatever its "
                                              "batch, shard, engine or thread count (for one model, dtype, device "
                                              "type, CPU kind and torch version; bf16 on CPUs with AMX: not across "
                                              "thread counts). Default: on for the CPU, off on CUDA and with "
                                              "--compile. README 'Reproducibility'."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N",
                                        help="Make only shard I of N (numbered from 0): the rows with "
                                             "shard_of(id, N) == I. Default: from the launcher's environment "
                                             "(SLURM array or srun, torchrun, Kubernetes Indexed Job), else every row."),
    shard_count: Optional[int] = typer.Option(None, "--shard-count", min=1,
                                              help="Total number of shards: needed with a Kubernetes Indexed Job "
                                                   "(JOB_COMPLETION_INDEX), and makes SLURM array task ids the shard "
                                                   "indices. Also $BATCHSD_SHARD_COUNT."),
    engine: Engine = typer.Option(Engine.local, "--engine", case_sensitive=False,
                                  help="local: this process. ray: spread the rows over a Ray cluster "
                                       "(pip install 'batchsd[ray]'); the same output folder."),
    prediction_type: Optional[PredictionType] = PREDICTION_TYPE_OPTION,
    reuse_out: bool = typer.Option(False, "--reuse-out",
                                   help="Let this job use an --out folder that holds another manifest's job "
                                        "(refused otherwise: two manifests of one name share the default --out)."),
    output_format: OutputFormat = typer.Option(
        OutputFormat.files, "--format", case_sensitive=False,
        help="files: images/<id>.<ext>. webdataset: tar shards in img2dataset's layout (webdataset/, with "
             "sizes.json). parquet: Hugging Face parquet shards with embedded images (data/train-*.parquet). "
             "imagefolder: train/<id>.<ext> + train/metadata.jsonl. README 'Output formats'."),
    image_format: ImageFormat = typer.Option(ImageFormat.png, "--image-format", case_sensitive=False,
                                             help="png (A1111 metadata chunks), jpg or webp (A1111 parameters "
                                                  "in EXIF UserComment)."),
    quality: Optional[int] = typer.Option(None, "--quality", min=1, max=100,
                                          help="jpg/webp quality. Default: 95 for jpg, 90 for webp."),
    shard_size: int = typer.Option(DEFAULT_SHARD_SIZE, "--shard-size", min=1,
                                   help="webdataset/parquet: rows per dataset shard (shard k holds rows "
                                        "k*N..(k+1)*N-1 of this run, in manifest order)."),
    captions: bool = typer.Option(False, "--captions", help="--format files: also images/<id>.txt (the prompt)."),
    column_map: Optional[str] = MAP_OPTION,
    wildcards: Optional[Path] = WILDCARDS_OPTION,
    prompt_syntax: PromptSyntax = PROMPT_SYNTAX_OPTION,
    lora_dir: Optional[Path] = LORA_DIR_OPTION,
    embeddings_dir: Optional[Path] = EMBEDDINGS_DIR_OPTION,
    workers: int = typer.Option(1, "--workers", min=1,
                                help="--engine ray: actors, each with its own model (one GPU each where the "
                                     "cluster has GPUs)."),
) -> None:
    """Make the images of MANIFEST; resumable: run the same command again to finish an interrupted job."""
    from batchsd.errors import BatchSDError
    from batchsd.job.progress import print_summary
    from batchsd.job.options import ManifestInvalid, RunOptions
    from batchsd.job.outputs.spec import OutputSpec
    from batchsd.job.run import run as run_job

    import os

    from batchsd.scale.launchers import resolve_shard, shard_device

    err = _err_console()
    spec = None
    try:
        output = OutputSpec(format=output_format.value, image_format=image_format.value, quality=quality,
                            shard_size=shard_size, captions=captions)
    except BatchSDError as e:
        raise _fail(err, str(e), 2)
    if engine is Engine.ray and output != OutputSpec():
        raise _fail(err, "--engine ray writes --format files with PNG images only: drop --format/--image-format/"
                         "--quality/--captions, or run with --engine local (or --shard I/N processes)", 2)
    if engine is Engine.ray:
        if shard is not None or shard_count:
            raise _fail(err, "--engine ray spreads the rows over its workers itself: drop --shard/--shard-count", 2)
    else:
        if workers != 1:
            raise _fail(err, "--workers is for --engine ray; to split a job across processes use --shard I/N "
                             "(or a SLURM array, srun, torchrun or a Kubernetes Indexed Job)", 2)
        try:
            spec = resolve_shard(shard, shard_count, os.environ)
        except BatchSDError as e:
            raise _fail(err, str(e), 2)
        if spec is not None:
            if spec.is_whole:   # a shard's own line comes from the runner, with its row count
                err.print(escape(str(spec)) + ": one shard, every row")
            device = shard_device(spec, device)
    opts = RunOptions(manifest=manifest, model=model, out_dir=Path(out) if out is not None else None,
                      batch_size=batch_size, device=device,
                      dtype=dtype.value, save_latents=save_latents, limit=limit, dry_run=dry_run,
                      overwrite=overwrite, retry_errors=retry_errors, verify=verify, low_memory=low_memory,
                      compile=None if compile is Compile.none else compile.value,
                      winograd={"auto": None, "on": True, "off": False}[winograd.value], exact=exact,
                      fused_attention=attention.asked, fused_epilogues=epilogues.asked,
                      shard=None if spec is None or spec.is_whole else spec, reuse_out=reuse_out,
                      prediction_type=prediction_type.value if prediction_type else None, output=output,
                      manifest_options=_manifest_options(column_map, wildcards, prompt_syntax, lora_dir,
                                                        embeddings_dir))
    try:
        if engine is Engine.ray and not dry_run:
            from batchsd.scale.ray_engine import run_ray

            summary = run_ray(opts, workers=workers, console=err)
        else:
            summary = run_job(opts, err, out_console=_out_console())
    except ManifestInvalid as e:
        from batchsd.job.reader import warning_lines

        for line in warning_lines(e.manifest):
            err.print(line, style="yellow", markup=False)
        err.print(escape(e.manifest.format_problems()))
        err.print("nothing was run: fix the manifest (`batchsd validate` lists every problem) and run again")
        raise typer.Exit(2)
    except BatchSDError as e:
        raise _fail(err, str(e), 2)
    except KeyboardInterrupt:
        err.print("[yellow]stopped; finished rows are kept: run the same command again to resume[/yellow]")
        raise typer.Exit(130)
    except (RuntimeError, OSError) as e:  # e.g. the disk filled up while writing results
        from batchsd.job.options import EXIT_STOPPED

        raise _fail(err, f"{e}; finished rows are kept: fix the cause and run the same command again", EXIT_STOPPED)
    _print_to_stdout(lambda: print_summary(_out_console(), summary))
    raise typer.Exit(summary.exit_code)


@app.command()
def validate(
    manifest: Path = typer.Argument(..., help="Job manifest (.csv, .parquet, .txt or .jsonl)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", min=1, help="Batch size for the plan shown."),
    model: Optional[str] = MODEL_OPTION,
    column_map: Optional[str] = MAP_OPTION,
    wildcards: Optional[Path] = WILDCARDS_OPTION,
    prompt_syntax: PromptSyntax = PROMPT_SYNTAX_OPTION,
    lora_dir: Optional[Path] = LORA_DIR_OPTION,
    embeddings_dir: Optional[Path] = EMBEDDINGS_DIR_OPTION,
    prediction_type: Optional[PredictionType] = PREDICTION_TYPE_OPTION,
    expanded: Optional[Path] = typer.Option(None, "--expanded", metavar="OUT.parquet",
                                            help="Write the job's rows (after n_images, seed ranges and prompt "
                                                 "templates; defaults resolved) as a Parquet manifest: exactly what "
                                                 "`batchsd run` will make, and `batchsd run OUT.parquet` makes the "
                                                 "same images."),
) -> None:
    """List every problem in MANIFEST and print the batch plan; loads no model (reads the models' headers:
    their default sizes, and the families LoRAs and embeddings are checked against, are those `run` uses).

    Exit 0: ready to run; 1: the manifest is valid but some rows will fail (unreadable init
    images); 2: manifest problems (`batchsd run` would refuse it).
    """
    from batchsd.job.manifest import read_manifest
    from batchsd.job.init_images import resolve_image_sizes
    from batchsd.job.model_choice import with_model_defaults
    from batchsd.job.options import RunOptions
    from batchsd.job.plan import plan_batches
    from batchsd.job.progress import print_plan

    from batchsd.job.reader import warning_lines

    out = _out_console()
    options = with_model_defaults(RunOptions(
        manifest=manifest, model=model, prediction_type=prediction_type.value if prediction_type else None,
        manifest_options=_manifest_options(column_map, wildcards, prompt_syntax, lora_dir, embeddings_dir))
    ).manifest_options
    m = read_manifest(manifest, options)
    for line in warning_lines(m):
        out.print(line, style="yellow", markup=False)
    if m.problems:
        out.print(escape(m.format_problems(limit=len(m.problems))))
        raise typer.Exit(2)
    rows, failures = resolve_image_sizes(list(m.rows))
    by_index = {r.index: r for r in m.rows}
    made = f" from {m.num_rows} data row(s)" if m.rows and m.rows[0].source_row is not None else ""   # expand.py
    out.print(f"{escape(str(manifest))}: {len(m.rows)} row(s){made}, columns: {escape(', '.join(m.columns))}"
              + (f" (passed through: {escape(', '.join(m.extra_columns))})" if m.extra_columns else ""))
    if expanded is not None:
        from batchsd.job.expand import write_expanded

        try:
            write_expanded(m, expanded)
        except OSError as e:
            raise _fail(_err_console(), f"cannot write {expanded}: {e}", 2)
        out.print(f"expanded manifest: {escape(str(expanded))} ({len(m.rows)} row(s), one image each)")
    for index, reason in failures.items():
        row = by_index[index]
        out.print(f"[red]data row {row.data_row} (id {escape(repr(row.id))}), column 'init_image':[/red] "
                  f"{escape(str(reason))}")
    print_plan(out, plan_batches(rows, batch_size), batch_size)
    if options.model_generation is None and any(r.model is None for r in m.rows):
        out.print("[yellow]note:[/yellow] no model given (--model, $BATCHSD_MODEL), nor one checkpoint in ./weights/: rows "
                  "without a model cell are planned at the default 512x512 where unsized, and their LoRAs and "
                  "embeddings are not checked against a model family")
    if failures:
        out.print(f"{len(failures)} row(s) will fail and be recorded as errors; the others can run")
        raise typer.Exit(1)
    out.print("[green]ok[/green]: ready to run")


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="Checkpoint file (.safetensors, .ckpt) or diffusers folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Show a checkpoint's format, layout, dtype, missing/extra keys and sha256 prefix, and check that
    its weights hold no NaN or inf (each tensor is read once; the model is not built).

    Exit 0: loadable; 1: readable but not loadable (the report says why); 2: cannot be read.
    """
    from batchsd.errors import BatchSDError

    err = _err_console()
    if not model.exists():
        raise _fail(err, f"{model} does not exist: give a .safetensors/.ckpt file or a diffusers folder", 2)
    try:
        from batchsd.model.checkpoint import inspect_checkpoint
        report = inspect_checkpoint(model, check_values=True)
    except BatchSDError as e:
        raise _fail(err, str(e), 2)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_report(_out_console(), report)
    if report.get("loadable") is False:
        raise typer.Exit(1)


@app.command()
def status(
    out: Path = typer.Argument(..., help="The --out folder of a run (sharded or not)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest",
                                            help="The job's manifest. Default: the one recorded by the run "
                                                 "(.batchsd/run.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    verify: bool = typer.Option(False, "--verify", help="Count a row ok only if its image file hashes to the "
                                "image_sha256 of its result (reads every image; loose-file formats only)."),
) -> None:
    """Rows ok, failed and missing, per shard and overall; loads no model.

    Exit 0: every row ok; 1: every row made, some failed; 3: some rows not made yet; 2: usage error.
    When no row is missing and no shard runs, it writes the whole job's results if missing or out of date.
    """
    from batchsd.errors import BatchSDError
    from batchsd.job.status import collect_status, print_status

    err = _err_console()
    try:
        report = collect_status(out, manifest, verify=verify)
    except BatchSDError as e:
        raise _fail(err, str(e), 2)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print_status(_out_console(), report)
    raise typer.Exit(report.exit_code)


def _print_report(out: Console, report: dict) -> None:
    """key  value lines; long lists cut at 10, nested details left to --json."""
    shown = {k: v for k, v in report.items() if not (k == "error" and v is None)}
    width = max((len(str(k)) for k in shown), default=0)
    for key, value in shown.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value[:10])) + (f", ... ({len(value)} in all)" if len(value) > 10 else "") \
                or "none"
        elif isinstance(value, dict):
            if any(isinstance(v, dict) for v in value.values()):
                value = "(nested; `batchsd inspect --json` shows it)"
            else:
                value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
        out.print(f"{escape(str(key)).ljust(width)}  {escape(str(value))}")


def _print_to_stdout(show) -> None:
    """A closed stdout (`batchsd run ... | head`) must not turn a finished run into a failure: the
    work is done and recorded; the summary is also in summary.json."""
    import os
    import sys

    try:
        show()
        sys.stdout.flush()
    except (BrokenPipeError, SystemExit):   # rich answers a broken pipe with SystemExit(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # so the interpreter's final flush does not fail again


def main() -> None:
    app()


if __name__ == "__main__":
    main()
