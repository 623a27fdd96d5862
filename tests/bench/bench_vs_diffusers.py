"""batchsd against diffusers, side by side on the same random-weight SD 1.5 checkpoint.

    python tests/bench/bench_vs_diffusers.py            # the standard run (< 10 min on 2 cores)
    python tests/bench/bench_vs_diffusers.py --quick    # 256x256 only, fewer repeats (~4 min)
    python tests/bench/bench_vs_diffusers.py --profile  # op breakdown of one UNet CFG step, each side

Both sides load one fp16 single-file checkpoint (random weights, full SD 1.5 widths, built once into
~/.cache/batchsd-bench by bench_common.random_checkpoint) with the same threads, dtype and settings:
figure 1 in this process, figures 2-4 in child processes this one starts, one per side per repeat.
Measurements alternate batchsd / diffusers so that load from other processes on the machine hits
both alike. Reported: medians, and the ratio batchsd / diffusers with which way is better.

Figures
  1. UNet forward with CFG (batch 2 per image) per image-step, fp32 and bf16: batchsd as it samples
     (Pipeline.unet: packed convolution weights, channels_last) against diffusers in both memory
     layouts, as seconds and as achieved TFLOP/s (FLOPs counted on the meta device: 1.607 TFLOP per
     CFG image-step at 512x512, 0.360 at 256x256) against torch.mm's rate on 4096^2 matrices (the
     practical roof).
  2. End to end: images/s for a Parquet manifest through `batchsd run` (batchsd.job.run.run) at batch sizes
     1, 2, 8 against a diffusers loop doing the same rows in batched calls and saving PNGs, with
     diffusers' faster layout from figure 1. One fresh process per side, as users run them: each
     loads and warms up (one 1-row 1-step image; neither timed); then each batch size runs on the
     same rows in one process and right after in the other (both stay loaded), so that both sides
     of a pair see the machine at the same minute; which side goes first alternates from batch
     size to batch size and repeat to repeat. dtype: what `batchsd run` picks here (--e2e-dtype).
     Run last, after this process has freed its models.
  3. Start-up: checkpoint on disk to first saved image, in a fresh subprocess per side
     (imports + load + one image), alternating sides; the file is in the page cache for both.
     Run first, before this process loads any model.
  4. Peak RSS (the child's own VmHWM) while loading and over the whole start-up run, per side in
     its own subprocess (RSS is per process, so the in-process figures above cannot give it).

The process sets the CPU allocator as `batchsd run` does (allocator.tune_cpu_allocator) after the
start-up children: in one process it holds for both sides alike, and both end-to-end children set
it. The batchsd start-up child sets it too, the diffusers start-up child does not (a diffusers
script would not).

Timings are only meaningful on a quiet machine: check the load average printed in the header.
Method, results and the levers they point to: docs/performance.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

T_PROCESS = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPTS = [
    "a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dawn",
    "a red sports car parked in the rain, cinematic", "a bowl of ramen, studio lighting, 85mm",
    "an owl made of brass gears, intricate", "a snowy mountain village at night, lanterns",
    "portrait of an old fisherman, oil on canvas", "a cat wearing a wizard hat, digital art",
]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_PROCESS:6.0f}s] {msg}", file=sys.stderr, flush=True)


def better(ratio: float, lower_is_better: bool) -> str:
    """Which side wins for a batchsd / diffusers ratio."""
    if abs(ratio - 1) < 0.03:
        return "tie (<3%)"
    win = (ratio < 1) == lower_is_better
    return f"batchsd {1 / ratio if lower_is_better else ratio:.2f}x better" if win else \
        f"diffusers {ratio if lower_is_better else 1 / ratio:.2f}x better"


# ---------------------------------------------------------------- 1. UNet forward with CFG
def set_layout(module: torch.nn.Module, layout: str) -> None:
    module.to(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)


@torch.inference_mode()
def bench_unet(ours, theirs, dtype: torch.dtype, size: int, reps: int, warmup: bool = True) -> list[dict]:
    """One UNet forward on a CFG pair (batch 2): batchsd's as it samples (`Pipeline.unet`: packed
    weights, channels_last) against diffusers' in both layouts, alternating; (wall, CPU) per call."""
    g = torch.Generator().manual_seed(0)
    h = size // 8
    x = torch.randn(2, 4, h, h, generator=g).to(dtype)
    ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0])
    x_ours = x.contiguous(memory_format=ours.memory_format)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    runs = {("batchsd", "shipped"): lambda: ours.unet(x_ours, t, ctx),
            ("diffusers", "contig"): lambda: theirs.unet(x, t, encoder_hidden_states=ctx, return_dict=False),
            ("diffusers", "cl"): lambda: theirs.unet(x_cl, t, encoder_hidden_states=ctx, return_dict=False)}
    times = {k: [] for k in runs}
    for rep in range(0 if warmup else 1, reps + 1):   # rep 0 is the warm-up, not recorded
        for (side, layout), fn in runs.items():
            if side == "diffusers":
                set_layout(theirs.unet, layout)
            wall, cpu = bc.timed2(fn)
            if rep:
                times[(side, layout)].append((wall, cpu))
        if rep:
            log(f"unet {size} {dtype} rep {rep}: " + ", ".join(
                f"{s}/{lay} {v[-1][0]:.2f}s ({v[-1][1]:.2f} cpu)" for (s, lay), v in times.items()))
    set_layout(theirs.unet, "contig")
    flop = bc.unet_tflop(size) * 1e12
    return [dict(side=s, layout=lay, dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], size=size, reps=reps,
                 tflop=flop / 1e12, median_s=bc.median([w for w, _ in v]), min_s=min(w for w, _ in v),
                 cpu_s=bc.median([c for _, c in v]), tflops=flop / min(w for w, _ in v) / 1e12)
            for (s, lay), v in times.items()]


def diffusers_best_layout(unet_results: list[dict], dtype_name: str, size: int) -> str:
    """diffusers' faster layout (median CPU time) at this dtype and size, from the UNet figures."""
    mine = [r for r in unet_results if r["side"] == "diffusers" and r["dtype"] == dtype_name and r["size"] == size]
    return min(mine, key=lambda r: r["cpu_s"])["layout"] if mine else "contig"


# ---------------------------------------------------------------- 2. end to end
def rows_for(n: int, size: int, steps: int, tag: str) -> list[dict]:
    return [dict(id=f"r{i:04d}", prompt=f"{PROMPTS[i % len(PROMPTS)]}, {tag}", seed=1000 + i, steps=steps,
                 cfg_scale=7.5, sampler="euler", width=size, height=size) for i in range(n)]


def write_manifest(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def diffusers_generate(pipe, rows: list[dict]) -> list:
    gens = [torch.Generator("cpu").manual_seed(r["seed"]) for r in rows]
    r0 = rows[0]
    out = pipe(prompt=[r["prompt"] for r in rows], negative_prompt=[""] * len(rows),
               num_inference_steps=r0["steps"], guidance_scale=r0["cfg_scale"], width=r0["width"],
               height=r0["height"], generator=gens if len(rows) > 1 else gens[0], output_type="pil")
    return out.images


def batchsd_run(pipe, rows: list[dict], batch: int, folder: Path):
    """The rows as a Parquet manifest through `batchsd run` (batchsd.job.run.run with the loaded pipeline):
    manifest reading, planning, batches, PNG + journal writes, results.parquet, summary.json."""
    from rich.console import Console

    from batchsd.job.options import RunOptions

    from batchsd.job.run import run

    manifest = write_manifest(rows, folder / "manifest.parquet")
    with open(os.devnull, "w") as devnull:
        summary = run(RunOptions(manifest=manifest, out_dir=folder / "out", batch_size=batch),
                      Console(file=devnull, stderr=False), rich_bar=False, pipe=pipe)
    if summary.ok != len(rows):
        raise RuntimeError(f"batchsd run made {summary.ok} of {len(rows)} rows")
    return summary


def diffusers_loop(pipe, rows: list[dict], batch: int, folder: Path) -> None:
    """What a diffusers script does with the same rows: batched calls, one generator per row, PNG files."""
    out = folder / "diffusers"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        for r, image in zip(chunk, diffusers_generate(pipe, chunk)):
            image.save(out / f"{r['id']}.png")


def e2e_child(side: str, spec_path: Path, threads: int, winograd: bool | None) -> None:
    """One fresh process per side, as a user runs `batchsd run` or a diffusers script: load (not
    timed), one untimed 1-row 1-step warm-up, then "READY" on stdout; then, for each "RUN i" line on
    stdin, run i of the spec, timed, and answer "DONE <json>": batch, rows, wall s, process CPU s.
    PNGs go to the spec's folders. Both sides set the CPU allocator as `batchsd run` does, so the
    comparison does not credit batchsd with what a mallopt call would give a diffusers script too."""
    from batchsd.model.fast.allocator import tune_cpu_allocator

    torch.set_num_threads(threads)
    tune_cpu_allocator()
    spec = json.loads(spec_path.read_text())
    path = bc.random_checkpoint()
    warm = rows_for(1, spec["size"], 1, tag=f"warm-up {side}")
    if side == "batchsd":
        pipe = bc.load_batchsd(path, spec["dtype"], winograd=winograd)
        with tempfile.TemporaryDirectory(prefix="batchsd-warm-") as tmp:
            batchsd_run(pipe, warm, 1, Path(tmp))
    else:
        pipe = bc.load_diffusers(path, DTYPES[spec["dtype"]])
        for m in (pipe.unet, pipe.vae):
            set_layout(m, spec["diffusers_layout"])
        with torch.inference_mode():
            diffusers_generate(pipe, warm)
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.startswith("RUN "):
            break
        run = spec["runs"][int(line.split()[1])]
        folder = Path(run["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        if side == "batchsd":
            wall, cpu = bc.timed2(lambda: batchsd_run(pipe, run["rows"], run["batch"], folder))
        else:
            with torch.inference_mode():
                wall, cpu = bc.timed2(lambda: diffusers_loop(pipe, run["rows"], run["batch"], folder))
        print("DONE " + json.dumps(dict(batch=run["batch"], rows=len(run["rows"]), wall_s=wall, cpu_s=cpu)), flush=True)


class E2EChild:
    """A running e2e_child: `run(i)` asks it for run i of its spec and returns its DONE record."""

    def __init__(self, side: str, spec_path: Path, threads: int, winograd: str, log_dir: Path):
        self.side = side
        self.stderr_path = log_dir / f"{side}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", side, "--e2e-spec", str(spec_path), "--threads", str(threads),
             "--winograd", winograd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._expect("READY")

    def _expect(self, word: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(word):
                return line[len(word):].strip()
        self.proc.wait()
        self._stderr.flush()
        raise RuntimeError(f"{self.side} e2e child ended ({self.proc.returncode}) before {word}:\n"
                           f"{self.stderr_path.read_text()[-3000:]}")

    def run(self, i: int) -> dict:
        self.proc.stdin.write(f"RUN {i}\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("DONE"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self._stderr.close()


def png_of(folder: Path, side: str, row_id: str) -> Path:
    return folder / "out" / "images" / f"{row_id}.png" if side == "batchsd" else folder / "diffusers" / f"{row_id}.png"


def bench_e2e(dtype_name: str, size: int, steps: int, plan: list[tuple[int, int]], reps: int, threads: int,
              winograd: str, layout: str) -> tuple[list[dict], dict]:
    """images/s over `rows` rows in batches of `batch`, for (batch, rows) in plan. Per repeat, one
    fresh process per side (e2e_child), both loaded before anything is timed, then each run of the
    plan on the same rows by one side and right after by the other, the order alternating from run to
    run and repeat to repeat: both sides of a pair see the machine as it is at that minute (a slowed
    machine slowed whole sequential runs before). Fresh prompts each repeat (a real manifest's prompts
    are mostly distinct). Each process grows its own heap at each new shape and pays for it, as a
    user's would. Also returns the parity check: the first row's PNG from both sides of the first
    batch-1 run of repeat 0, mean and max |pixel difference| (0-255), a check that both do the same work."""
    from PIL import Image

    results, parity = {}, {}
    sides = ("batchsd", "diffusers")
    for rep in range(reps):
        with tempfile.TemporaryDirectory(prefix="batchsd-e2e-") as tmp:
            tmp = Path(tmp)
            runs = [dict(batch=b, rows=rows_for(n, size, steps, tag=f"rep {rep} batch {b}")) for b, n in plan]
            children = {}
            try:
                for side in sides[::1 if rep % 2 == 0 else -1]:   # the other loads while this one idles
                    spec = dict(size=size, dtype=dtype_name, diffusers_layout=layout,
                                runs=[dict(r, folder=str(tmp / side / f"run{i}")) for i, r in enumerate(runs)])
                    spec_path = tmp / f"{side}.json"
                    spec_path.write_text(json.dumps(spec))
                    children[side] = E2EChild(side, spec_path, threads, winograd, tmp)
                for i in range(len(runs)):
                    for side in sides[::1 if (rep + i) % 2 == 0 else -1]:
                        r = children[side].run(i)
                        results.setdefault((side, r["batch"]), []).append(
                            (r["rows"] / r["wall_s"], r["cpu_s"] / r["rows"], r["rows"]))
                        log(f"e2e {size} batch {r['batch']} rep {rep} {side}: {r['rows'] / r['wall_s']:.3f} img/s, "
                            f"{r['cpu_s'] / r['rows']:.1f} cpu-s/img")
            finally:
                for child_ in children.values():
                    child_.close()
            first = next((i for i, (b, _) in enumerate(plan) if b == 1), None)
            if rep == 0 and first is not None:
                row_id = runs[first]["rows"][0]["id"]
                parity = bc.pixel_diff(*(Image.open(png_of(tmp / side / f"run{first}", side, row_id)) for side in sides))
    return [dict(side=s, batch=b, size=size, steps=steps, rows=v[0][2], reps=reps,
                 images_per_s=bc.median([x[0] for x in v]), cpu_s_per_image=bc.median([x[1] for x in v]),
                 pairs=[x[0] for x in v])   # img/s repeat by repeat
            for (s, b), v in results.items()], parity


# ---------------------------------------------------------------- 3-4. start-up and RSS (subprocess)
def child(side: str, dtype_name: str, size: int, steps: int, threads: int, winograd: bool | None = None) -> None:
    """One fresh process: load, make one image and save it as PNG; print JSON with times and peak RSS.
    The batchsd side sets the CPU allocator as `batchsd run` does on the CPU (allocator.tune_cpu_allocator)."""

    torch.set_num_threads(threads)
    t_import = time.perf_counter() - T_PROCESS
    path = bc.random_checkpoint()
    row = rows_for(1, size, steps, tag="startup")
    t0 = time.perf_counter()
    if side == "batchsd":
        from batchsd import GenerationRow
        from batchsd.model.fast.allocator import tune_cpu_allocator

        tune_cpu_allocator()
        pipe = bc.load_batchsd(path, dtype_name, winograd=winograd)
        load_s = time.perf_counter() - t0
        rss_load = bc.peak_rss_gib(own=True)
        r = row[0]
        with torch.inference_mode():
            image = pipe.generate([GenerationRow(prompt=r["prompt"], seed=r["seed"], steps=steps, sampler="euler",
                                                 width=size, height=size)]).images[0]
    else:
        pipe = bc.load_diffusers(path, DTYPES[dtype_name])
        load_s = time.perf_counter() - t0
        rss_load = bc.peak_rss_gib(own=True)
        with torch.inference_mode():
            image = diffusers_generate(pipe, row)[0]
    with tempfile.TemporaryDirectory() as tmp:
        image.save(Path(tmp) / "first.png")
    total = time.perf_counter() - T_PROCESS
    print("CHILD " + json.dumps(dict(side=side, import_s=t_import, load_s=load_s, first_image_s=total - t_import - load_s,
                                     to_first_image_s=total, peak_rss_load_gib=rss_load, peak_rss_gib=bc.peak_rss_gib(own=True),
                                     cpu_s=time.process_time())))


def warm_memory(gib: float) -> float:
    """Touch `gib` GiB once in a child process, so that what follows runs on memory this machine has
    already used. On a freshly booted VM the first touch of each page costs the hypervisor (here:
    25 s for 14 GiB, a load taking 2-3x longer); a machine that has run anything big does not pay it,
    and without this the side that runs first would pay it for both. Returns the seconds it took."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import torch; torch.ones({int(gib * 2**30)}, dtype=torch.uint8)"], check=True)
    return time.perf_counter() - t0


def bench_startup(dtype_name: str, size: int, steps: int, threads: int, reps: int, winograd: str) -> list[dict]:
    path = bc.random_checkpoint()
    with open(path, "rb") as f:             # page cache warm for both sides
        while f.read(1 << 26):
            pass
    out = []
    for rep in range(reps):
        for side in ("batchsd", "diffusers"):
            t0 = time.perf_counter()
            rec = bc.run_child(__file__, "--child", side, "--child-dtype", dtype_name, "--child-size", str(size),
                               "--steps", str(steps), "--threads", str(threads), "--winograd", winograd,
                               what=f"{side} start-up child")
            wall = time.perf_counter() - t0
            rec.update(wall_s=wall, rep=rep, dtype=dtype_name, size=size, steps=steps)
            out.append(rec)
            log(f"startup {side} rep {rep}: wall {wall:.1f}s (load {rec['load_s']:.1f}s), "
                f"peak RSS {rec['peak_rss_gib']:.2f} GiB (load {rec['peak_rss_load_gib']:.2f})")
    return out


# ---------------------------------------------------------------- profile
@torch.inference_mode()
def profile_step(ours, theirs, dtype: torch.dtype, size: int, layout: str, top: int = 18) -> str:
    """Op tables of one UNet CFG step: batchsd as shipped, diffusers in `layout`."""
    from torch.profiler import ProfilerActivity, profile

    h = size // 8
    x = torch.randn(2, 4, h, h).to(dtype)
    ctx = torch.randn(2, 77, 768).to(dtype)
    t = torch.tensor([500.0, 500.0])
    x_ours = x.contiguous(memory_format=ours.memory_format)
    x_theirs = x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x
    set_layout(theirs.unet, layout)
    text = []
    for side, fn in (("batchsd", lambda: ours.unet(x_ours, t, ctx)),
                     ("diffusers", lambda: theirs.unet(x_theirs, t, encoder_hidden_states=ctx, return_dict=False))):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)
        text.append(f"### {side}, {dtype}, {size}x{size}, " + (f"diffusers layout {layout}" if side == "diffusers"
                                                               else "as shipped") + f"\n{table}")
    set_layout(theirs.unet, "contig")
    return "\n".join(text)


# ---------------------------------------------------------------- report
def fmt_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


STARTUP_FIGURES = (("to_first_image_s", "disk to first image, s (child's clock)"), ("wall_s", "subprocess wall, s"),
                   ("cpu_s", "CPU, s (whole child)"), ("import_s", "imports, s"), ("load_s", "load, s"),
                   ("first_image_s", "first image, s"), ("peak_rss_load_gib", "peak RSS while loading, GiB"),
                   ("peak_rss_gib", "peak RSS whole run, GiB"))


def startup_table(startup: list[dict]) -> str:
    """The start-up children's figures (STARTUP_FIGURES), each side's median and the ratio, as a table
    (this script's and bench_sdxl_vs_diffusers.py's)."""
    rows = []
    for key, label in STARTUP_FIGURES:
        vb = bc.median([r[key] for r in startup if r["side"] == "batchsd"])
        vd = bc.median([r[key] for r in startup if r["side"] == "diffusers"])
        rows.append([label, f"{vb:.2f}", f"{vd:.2f}", f"{vb / vd:.2f}", better(vb / vd, True)])
    return fmt_table(["figure", "batchsd", "diffusers", "ratio b/d", "better"], rows)


def report(res: dict) -> str:
    out = [f"date {res['date']}, torch {res['torch']}, diffusers {res['diffusers']}, threads {res['threads']}, "
           f"load average at start {res['loadavg']}, code {res['git']}, command `{res['command']}`",
           f"{res['cpu']}; CPU allocator tuned in this process (both sides): {res['allocator_tuned']}; "
           f"batchsd --winograd {res.get('winograd', 'auto')} (auto: as shipped, devices.default_winograd), "
           f"--attention {res.get('attention', 'auto')}",
           f"matmul roof (torch.mm 4096^2, best of 3): fp32 {res['roof']['fp32']:.3f} TFLOP/s, "
           f"bf16 {res['roof']['bf16']:.3f} TFLOP/s"]
    if res.get("unet"):
        rows = []
        by = {(r["side"], r["layout"], r["dtype"], r["size"]): r for r in res["unet"]}
        for (side, lay, dt, size), r in sorted(by.items(), key=lambda kv: (kv[0][2] != "fp32", kv[0][3])):
            if side != "batchsd":
                continue
            roof = res["roof"][dt]
            cells = [f"{size}", dt, f"{r['median_s']:.2f} / {r['min_s']:.2f} / {r['cpu_s']:.2f}",
                     f"{r['tflops']:.3f} ({r['tflops'] / roof:.0%})"]
            for d_lay in ("contig", "cl"):
                d = by[("diffusers", d_lay, dt, size)]
                cells += [f"{d['median_s']:.2f} / {d['min_s']:.2f} / {d['cpu_s']:.2f}", f"{r['median_s'] / d['median_s']:.2f}"]
            best = min((by[("diffusers", x, dt, size)] for x in ("contig", "cl")), key=lambda v: v["median_s"])
            cells += [f"{best['tflops']:.3f} ({best['tflops'] / roof:.0%})",
                      f"{best['median_s'] / r['median_s']:.2f}x (vs {best['layout']})"]
            rows.append(cells)
        out += ["", "UNet forward on a CFG pair (batch 2) = one image-step; batchsd as it samples (packed weights, "
                "channels_last), diffusers in both layouts. Seconds: median wall / min wall / median CPU (process, "
                "all threads); ratio = batchsd / diffusers median wall (below 1: batchsd faster). TFLOP/s from the min "
                f"wall time and the counted FLOPs ({', '.join(f'{s}: {t:.3f} TFLOP' for s, t in sorted({(r['size'], r['tflop']) for r in res['unet']}))}).",
                fmt_table(["size", "dtype", "batchsd s", "batchsd TFLOP/s (of roof)", "diffusers contig s", "ratio",
                           "diffusers cl s", "ratio", "best diffusers TFLOP/s (of roof)",
                           "batchsd speed-up vs best diffusers"], rows)]
    if res.get("e2e"):
        by = {(r["side"], r["batch"]): r for r in res["e2e"]}
        e0 = res["e2e"][0]
        b8 = ({"b": "/".join(f"{x:.3f}" for x in by[("batchsd", 8)]["pairs"]),
               "d": "/".join(f"{x:.3f}" for x in by[("diffusers", 8)]["pairs"])}
              if e0["reps"] > 1 and ("batchsd", 8) in by and "pairs" in by[("batchsd", 8)] else None)
        rows = []
        for (side, b), r in sorted(by.items()):
            if side != "batchsd":
                continue
            d = by[("diffusers", b)]
            ratio = r["images_per_s"] / d["images_per_s"]
            cratio = r["cpu_s_per_image"] / d["cpu_s_per_image"]
            pairs = [x / y for x, y in zip(r.get("pairs", []), d.get("pairs", []))]   # repeat by repeat
            paired = f"{bc.median(pairs):.2f}x ({', '.join(f'{x:.2f}' for x in pairs)})" if len(pairs) > 1 else f"{ratio:.2f}x"
            rows.append([b, r["rows"], f"{r['images_per_s']:.3f}", f"{d['images_per_s']:.3f}", f"{ratio:.2f}x", paired,
                         f"{r['cpu_s_per_image']:.1f}", f"{d['cpu_s_per_image']:.1f}", f"{cratio:.2f}", better(cratio, True)])
        out += ["", f"End to end (text, {e0['steps']} steps euler at cfg 7.5, VAE decode, PNG files), {e0['size']}x{e0['size']}, "
                f"{res['e2e_dtype']}: a Parquet manifest through `batchsd run` (batchsd.job.run.run: planning, batches, PNG + "
                f"journal writes, results.parquet) vs a diffusers loop over the same rows in batched calls saving PNGs "
                f"(diffusers layout: {res['e2e_diffusers_layout']}, SDPA); a fresh process per side, both loaded and warmed "
                f"up (1 step; neither timed), each batch size run by one side and right after by the other (order "
                f"alternating), allocator tuned in both; medians of {e0['reps']}"
                + (f"; batch-8 pairs (img/s) batchsd {b8['b']}, diffusers {b8['d']}" if b8 else "")
                + ("; a pair is one repeat's run of a batch size by both sides, minutes apart at most" if e0["reps"] > 1 else ""),
                fmt_table(["batch", "rows", "batchsd img/s", "diffusers img/s", "img/s ratio b/d",
                           "img/s ratio, median of the pairs (each pair)", "batchsd CPU-s/img",
                           "diffusers CPU-s/img", "CPU ratio b/d", "better (CPU)"], rows)]
        if res.get("parity"):
            out.append(f"same row at batch 1, batchsd vs diffusers image: mean |diff| {res['parity']['mean_abs_pixel_diff']:.2f}/255, "
                       f"max {res['parity']['max_abs_pixel_diff']:.0f}/255")
    for dt in ("fp32", "bf16"):
        startup = [r for r in res.get("startup", []) if r["dtype"] == dt]
        if not startup:
            continue
        s0 = startup[0]
        out += ["", f"Start-up and memory: a fresh subprocess per side (RSS is per process), {dt} from the fp16 file, "
                f"one {s0['size']}x{s0['size']} image, {s0['steps']} steps, saved as PNG; file in the page cache, "
                f"memory warmed ({res['warm_memory_s']:.0f} s); medians of {len(startup) // 2} alternating runs",
                startup_table(startup)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256x256 only, fewer repeats")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", default="unet,e2e,startup", help="comma list of unet,e2e,startup")
    ap.add_argument("--e2e-reps", type=int, default=1,
                    help="repeats of the end-to-end plan, a fresh process per side each (medians; the order alternates), default 1")
    ap.add_argument("--e2e-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="dtype of the end-to-end and start-up figures; auto: what `batchsd run` picks here")
    ap.add_argument("--startup-dtypes", default="run",
                    help="comma list of fp32,bf16 for the start-up children; default: the run's dtype (--e2e-dtype) only")
    ap.add_argument("--winograd", choices=["auto", "on", "off"], default="auto",
                    help="batchsd's Winograd convolutions (Pipeline winograd=); auto: as shipped (devices.default_winograd)")
    ap.add_argument("--attention", choices=["auto", "fused", "torch"], default="auto",
                    help="batchsd's bf16 UNet attention in figure 1 (Pipeline fused_attention=; the other figures' children "
                         "run as shipped); auto: as shipped (devices.default_attention)")
    ap.add_argument("--unet-reps", type=int, help="repeats per size and dtype of figure 1 (default: 3 / 2, --quick 2)")
    ap.add_argument("--profile", action="store_true", help="print an op breakdown of one UNet step per side and exit")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child", choices=["batchsd", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--child-dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--child-size", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--e2e-spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    winograd = {"auto": None, "on": True, "off": False}[args.winograd]
    attention = {"auto": None, "fused": True, "torch": False}[args.attention]
    if args.child and args.e2e_spec:
        return e2e_child(args.child, args.e2e_spec, args.threads, winograd)
    if args.child:
        return child(args.child, args.child_dtype, args.child_size, args.steps, args.threads, winograd)

    torch.set_num_threads(args.threads)
    import diffusers

    from batchsd.model.devices import resolve_dtype
    from batchsd.model.fast.allocator import release_free_memory, tune_cpu_allocator

    only = set(args.only.split(","))
    e2e_dtype = bc.dtype_name(resolve_dtype(args.e2e_dtype, torch.device("cpu")))
    res = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
               diffusers=diffusers.__version__, threads=args.threads, cpu=bc.cpu_description(),
               loadavg=" ".join(f"{x:.1f}" for x in os.getloadavg()),
               command="python tests/bench/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               git=bc.git_state(), e2e_dtype=e2e_dtype, winograd=args.winograd,
               attention=args.attention)
    path = bc.random_checkpoint()
    res["roof"] = {"fp32": bc.matmul_roof(torch.float32), "bf16": bc.matmul_roof(torch.bfloat16)}
    log(f"roof {res['roof']}")
    if "startup" in only and not args.profile:   # first, while this process is still small
        res["warm_memory_s"] = warm_memory(14)
        log(f"memory warmed in {res['warm_memory_s']:.0f} s")
        res["startup"] = []
        startup_dtypes = [e2e_dtype] if args.startup_dtypes == "run" else args.startup_dtypes.split(",")
        for dt in sorted(startup_dtypes, key=lambda d: d != e2e_dtype):   # the run's dtype first, 2 runs
            reps = 1 if args.quick or dt != e2e_dtype else 2
            res["startup"] += bench_startup(dt, 256, args.steps, args.threads, reps=reps, winograd=args.winograd)
    # `batchsd run` tunes the allocator on the CPU; in one process it holds for both sides alike
    res["allocator_tuned"] = tune_cpu_allocator()

    if "unet" in only or args.profile:
        # fp32 first, then both pipelines cast to bf16 in place (batchsd's packed convolutions unpack,
        # cast and pack again at their next call)
        t0 = time.perf_counter()
        ours = bc.load_batchsd(path, "fp32", winograd=winograd)
        log(f"batchsd loaded fp32 in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        theirs = bc.load_diffusers(path, torch.float32)
        log(f"diffusers loaded fp32 in {time.perf_counter() - t0:.1f}s")

        def to_bf16():
            from batchsd.model.devices import default_winograd
            from batchsd.model.fast.winograd import use_winograd_in_model

            for m in (ours.model, theirs.unet, theirs.vae, theirs.text_encoder):
                m.to(torch.bfloat16)
            ours.dtype = torch.bfloat16
            ours._text_cache.clear()
            # Winograd, the attention kernel and the epilogues by Pipeline(dtype=bf16)'s rules (devices.py),
            # unless --winograd says
            if winograd or (winograd is None and default_winograd(ours.device, torch.bfloat16, ours.cpu_kind)):
                ours.winograd = use_winograd_in_model(ours.model) > 0 or ours.winograd
            ours.fused_attention = ours._use_fused_attention(attention, ours.device, torch.bfloat16, None)
            ours.fused_epilogues = ours._use_fused_epilogues(None, ours.device, torch.bfloat16, None)
            log(f"batchsd bf16: Winograd {ours.winograd}, fused attention {ours.fused_attention}, "
                f"fused epilogues {ours.fused_epilogues}")

        if args.profile:
            print(profile_step(ours, theirs, torch.float32, 256, "contig"))
            to_bf16()
            print(profile_step(ours, theirs, torch.bfloat16, 256, "cl"))
            return
        res["unet"] = []
        # (size, reps, warm-up): 256 first, so that 512 can skip its (costly) warm-up
        fp32_plan = [(256, 2, True)] if args.quick else [(256, 3, True), (512, 2, False)]
        bf16_plan = [(256, 2, True)] if args.quick else [(256, 2, True), (512, 2, False)]
        if args.unet_reps:
            fp32_plan, bf16_plan = ([(size, args.unet_reps, warm) for size, _, warm in plan] for plan in (fp32_plan, bf16_plan))
        for size, reps, warm in fp32_plan:
            res["unet"] += bench_unet(ours, theirs, torch.float32, size, reps, warm)
        to_bf16()
        for size, reps, warm in bf16_plan:
            res["unet"] += bench_unet(ours, theirs, torch.bfloat16, size, reps, warm)
        del ours, theirs, to_bf16
        gc.collect()
        release_free_memory()       # this process small again before the end-to-end children

    if "e2e" in only:               # a fresh process per side (e2e_child), diffusers in its faster layout
        layout = diffusers_best_layout(res.get("unet", []), e2e_dtype, 256)
        e2e_plan = [(1, 2), (8, 8)] if args.quick else [(1, 2), (2, 2), (8, 8)]
        res["e2e_diffusers_layout"] = layout
        res["e2e"], res["parity"] = bench_e2e(e2e_dtype, 256, args.steps, e2e_plan, args.e2e_reps, args.threads,
                                              args.winograd, layout)
        log(f"parity {res['parity']}")

    res["total_s"] = time.perf_counter() - T_PROCESS
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(report(res) + f"\n\ntotal run time {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
