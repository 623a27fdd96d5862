"""batchsd against diffusers, side by side on the same random-weight SD 1.5 checkpoint.

    python tests/bench/bench_vs_diffusers.py            # the standard run (< 10 min on 2 cores)
    python tests/bench/bench_vs_diffusers.py --quick    # 256x256 only, fewer repeats (~4 min)
    python tests/bench/bench_vs_diffusers.py --profile  # op breakdown of one UNet CFG step, each side

Both sides load one fp16 single-file checkpoint (random weights, full SD 1.5 widths, built once into
~/.cache/batchsd-bench by bench_common.random_checkpoint) and run in ONE process with the same
threads, dtype and settings; measurements alternate batchsd / diffusers within each repeat so that
load from other processes on the machine hits both alike. Reported: medians, and the ratio
batchsd / diffusers with which way is better.

Figures
  1. UNet forward with CFG (batch 2 per image) per image-step, fp32 and bf16, both memory layouts,
     as seconds and as achieved TFLOP/s (FLOPs counted on the meta device: 1.607 TFLOP per CFG
     image-step at 512x512, 0.360 at 256x256) against torch.mm's rate on 4096^2 matrices (the
     practical roof).
  2. End to end: images/s for a list of rows through batchsd Pipeline.generate at batch sizes 1, 2, 8
     against diffusers' StableDiffusionPipeline doing the same rows (per-row loop, and batched calls).
  3. Start-up: checkpoint on disk to first finished image, in a fresh subprocess per side
     (imports + load + one image), alternating sides; the file is in the page cache for both.
     Run first, before this process loads any model.
  4. Peak RSS (the child's own VmHWM) while loading and over the whole start-up run, per side in
     its own subprocess (RSS is per process, so the in-process figures above cannot give it).

Timings are only meaningful on a quiet machine: check the load average printed in the header.
Results and the levers they point to: tests/bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
def set_layout(unet: torch.nn.Module, layout: str, state: dict) -> None:
    if state.get(id(unet)) != layout:
        unet.to(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
        state[id(unet)] = layout


@torch.inference_mode()
def bench_unet(ours, theirs, dtype: torch.dtype, size: int, reps: int, layouts: list[str], warmup: bool = True) -> list[dict]:
    """One UNet forward on a CFG pair (batch 2) per side and layout, alternating; (wall, CPU) per call."""
    ours_unet, their_unet = ours.model.unet, theirs.unet
    g = torch.Generator().manual_seed(0)
    h = size // 8
    x = torch.randn(2, 4, h, h, generator=g).to(dtype)
    ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0])
    state: dict = {}

    def run(side: str, layout: str) -> tuple[float, float]:
        xin = x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x
        if side == "batchsd":
            set_layout(ours_unet, layout, state)
            return bc.timed2(lambda: ours_unet(xin, t, ctx))
        set_layout(their_unet, layout, state)
        return bc.timed2(lambda: their_unet(xin, t, encoder_hidden_states=ctx, return_dict=False))

    times = {(s, lay): [] for lay in layouts for s in ("batchsd", "diffusers")}
    for rep in range(0 if warmup else 1, reps + 1):   # rep 0 is the warm-up, not recorded
        for lay in layouts:
            for side in ("batchsd", "diffusers"):
                wall, cpu = run(side, lay)
                if rep:
                    times[(side, lay)].append((wall, cpu))
        log(f"unet {size} {dtype} rep {rep}: " + ", ".join(
            f"{s}/{lay} {v[-1][0]:.2f}s ({v[-1][1]:.2f} cpu)" for (s, lay), v in times.items() if v and rep))
    for unet in (ours_unet, their_unet):
        set_layout(unet, "contig", state)
    flop = bc.unet_tflop(size) * 1e12
    return [dict(side=s, layout=lay, dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], size=size, reps=reps, tflop=flop / 1e12,
                 median_s=bc.median([w for w, _ in v]), min_s=min(w for w, _ in v), cpu_s=bc.median([c for _, c in v]),
                 tflops=flop / min(w for w, _ in v) / 1e12)
            for (s, lay), v in times.items()]


# ---------------------------------------------------------------- 2. end to end
def rows_for(n: int, size: int, steps: int, tag: str):
    from batchsd import GenerationRow

    return [GenerationRow(prompt=f"{PROMPTS[i % len(PROMPTS)]}, {tag}", seed=1000 + i, steps=steps,
                          cfg_scale=7.5, sampler="euler", width=size, height=size) for i in range(n)]


def diffusers_generate(pipe, rows) -> list:
    gens = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]
    r0 = rows[0]
    out = pipe(prompt=[r.prompt for r in rows], negative_prompt=[r.negative_prompt for r in rows],
               num_inference_steps=r0.steps, guidance_scale=r0.cfg_scale, width=r0.width, height=r0.height,
               generator=gens if len(rows) > 1 else gens[0], output_type="pil")
    return out.images


@torch.inference_mode()
def bench_e2e(ours, theirs, size: int, steps: int, plan: list[tuple[int, int]], reps: int) -> list[dict]:
    """images/s over `rows` rows in chunks of `batch` rows, for (batch, rows) in plan, each side,
    alternating; fresh prompts every run (a real manifest's prompts are mostly distinct: no
    text-cache hits across runs). diffusers gets the same chunks as one batched call each
    (prompt list + one generator per row)."""
    results = {}
    runs = 0
    for rep in range(reps):
        for b, n_rows in plan:
            for side in ("batchsd", "diffusers"):
                runs += 1
                rows = rows_for(n_rows, size, steps, tag=f"run {runs}")

                def job():
                    for i in range(0, n_rows, b):
                        chunk = rows[i:i + b]
                        if side == "batchsd":
                            ours.generate(chunk)
                        else:
                            diffusers_generate(theirs, chunk)

                wall, cpu = bc.timed2(job)
                results.setdefault((side, b), []).append((n_rows / wall, cpu / n_rows, n_rows))
                log(f"e2e {size} batch {b} rep {rep} {side}: {n_rows / wall:.3f} img/s, {cpu / n_rows:.1f} cpu-s/img")
    return [dict(side=s, batch=b, size=size, steps=steps, rows=v[0][2], reps=reps,
                 images_per_s=bc.median([x[0] for x in v]), cpu_s_per_image=bc.median([x[1] for x in v]))
            for (s, b), v in results.items()]


@torch.inference_mode()
def parity_check(ours, theirs, size: int, steps: int) -> dict:
    """Same row both ways at batch 1: mean |pixel difference| (0-255); a check that both do the same work."""
    import numpy as np

    row = rows_for(1, size, steps, tag="parity")
    a = np.asarray(ours.generate(row).images[0], dtype=np.float32)
    b = np.asarray(diffusers_generate(theirs, row)[0], dtype=np.float32)
    return dict(mean_abs_pixel_diff=float(np.abs(a - b).mean()), max_abs_pixel_diff=float(np.abs(a - b).max()))


# ---------------------------------------------------------------- 3-4. start-up and RSS (subprocess)
def child(side: str, dtype_name: str, size: int, steps: int, threads: int) -> None:
    """One fresh process: load, make one image; print JSON with times and peak RSS."""
    torch.set_num_threads(threads)
    t_import = time.perf_counter() - T_PROCESS
    path = bc.random_checkpoint()
    t0 = time.perf_counter()
    if side == "batchsd":
        pipe = bc.load_batchsd(path, dtype_name)
        load_s = time.perf_counter() - t0
        rss_load = bc.peak_rss_gib(own=True)
        with torch.inference_mode():
            pipe.generate(rows_for(1, size, steps, tag="startup"))
    else:
        pipe = bc.load_diffusers(path, DTYPES[dtype_name])
        load_s = time.perf_counter() - t0
        rss_load = bc.peak_rss_gib(own=True)
        with torch.inference_mode():
            diffusers_generate(pipe, rows_for(1, size, steps, tag="startup"))
    total = time.perf_counter() - T_PROCESS
    print("CHILD " + json.dumps(dict(side=side, import_s=t_import, load_s=load_s, first_image_s=total - t_import - load_s,
                                     to_first_image_s=total, peak_rss_load_gib=rss_load, peak_rss_gib=bc.peak_rss_gib(own=True),
                                     cpu_s=time.process_time())))


def bench_startup(dtype_name: str, size: int, steps: int, threads: int, reps: int) -> list[dict]:
    path = bc.random_checkpoint()
    with open(path, "rb") as f:             # page cache warm for both sides
        while f.read(1 << 26):
            pass
    out = []
    for rep in range(reps):
        for side in ("batchsd", "diffusers"):
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, __file__, "--child", side, "--child-dtype", dtype_name,
                                     "--child-size", str(size), "--steps", str(steps), "--threads", str(threads)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stdout, stderr = proc.communicate()
            wall = time.perf_counter() - t0
            line = [ln for ln in stdout.splitlines() if ln.startswith("CHILD ")]
            if proc.returncode or not line:
                raise RuntimeError(f"{side} child failed ({proc.returncode}):\n{stderr[-3000:]}")
            rec = json.loads(line[-1][6:])
            rec.update(wall_s=wall, rep=rep, dtype=dtype_name, size=size, steps=steps)
            out.append(rec)
            log(f"startup {side} rep {rep}: wall {wall:.1f}s (load {rec['load_s']:.1f}s), "
                f"peak RSS {rec['peak_rss_gib']:.2f} GiB (load {rec['peak_rss_load_gib']:.2f})")
    return out


# ---------------------------------------------------------------- profile
@torch.inference_mode()
def profile_step(ours, theirs, dtype: torch.dtype, size: int, layout: str, top: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile

    h = size // 8
    x = torch.randn(2, 4, h, h).to(dtype)
    ctx = torch.randn(2, 77, 768).to(dtype)
    t = torch.tensor([500.0, 500.0])
    text = []
    for side, fn in (("batchsd", lambda: ours.model.unet(x, t, ctx)),
                     ("diffusers", lambda: theirs.unet(x, t, encoder_hidden_states=ctx, return_dict=False))):
        unet = ours.model.unet if side == "batchsd" else theirs.unet
        unet.to(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)
        text.append(f"### {side}, {dtype}, {size}x{size}, layout {layout}\n{table}")
        unet.to(memory_format=torch.contiguous_format)
    return "\n".join(text)


# ---------------------------------------------------------------- report
def fmt_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report(res: dict) -> str:
    out = [f"date {res['date']}, torch {res['torch']}, diffusers {res['diffusers']}, threads {res['threads']}, "
           f"load average at start {res['loadavg']}, code {res['git']}, command `{res['command']}`",
           f"matmul roof (torch.mm 4096^2, best of 3): fp32 {res['roof']['fp32']:.3f} TFLOP/s, "
           f"bf16 {res['roof']['bf16']:.3f} TFLOP/s"]
    if res.get("unet"):
        rows = []
        by = {(r["side"], r["layout"], r["dtype"], r["size"]): r for r in res["unet"]}
        for (side, lay, dt, size), r in sorted(by.items(), key=lambda kv: (kv[0][2] != "fp32", kv[0][3], kv[0][1] != "contig")):
            if side != "batchsd":
                continue
            d = by[("diffusers", lay, dt, size)]
            d_best = min((v for k, v in by.items() if k[0] == "diffusers" and k[2:] == (dt, size)), key=lambda v: v["cpu_s"])
            roof = res["roof"][dt]
            ratio, cratio = r["median_s"] / d["median_s"], r["cpu_s"] / d["cpu_s"]
            rows.append([f"{size}", dt, lay, f"{r['median_s']:.2f} / {r['min_s']:.2f} / {r['cpu_s']:.2f}",
                         f"{d['median_s']:.2f} / {d['min_s']:.2f} / {d['cpu_s']:.2f}", f"{ratio:.2f}",
                         f"{cratio:.2f}", better(cratio, True),
                         f"{r['tflops']:.3f} ({r['tflops'] / roof:.0%})", f"{d['tflops']:.3f} ({d['tflops'] / roof:.0%})",
                         f"{r['cpu_s'] / d_best['cpu_s']:.2f} (vs {d_best['layout']})"])
        out += ["", "UNet forward on a CFG pair (batch 2) = one image-step. Seconds: median wall / min wall / median "
                "CPU (process, all threads). TFLOP/s from the min wall time and the counted FLOPs "
                f"({', '.join(f'{s}: {t:.3f} TFLOP' for s, t in sorted({(r['size'], r['tflop']) for r in res['unet']}))}).",
                fmt_table(["size", "dtype", "layout", "batchsd s", "diffusers s", "wall ratio b/d", "CPU ratio b/d",
                           "better (CPU)", "batchsd TFLOP/s (of roof)", "diffusers TFLOP/s (of roof)",
                           "CPU ratio b / best diffusers"], rows)]
    if res.get("e2e"):
        by = {(r["side"], r["batch"]): r for r in res["e2e"]}
        e0 = res["e2e"][0]
        rows = []
        for (side, b), r in sorted(by.items()):
            if side != "batchsd":
                continue
            d = by[("diffusers", b)]
            ratio = r["images_per_s"] / d["images_per_s"]
            cratio = r["cpu_s_per_image"] / d["cpu_s_per_image"]
            rows.append([b, r["rows"], f"{r['images_per_s']:.3f}", f"{d['images_per_s']:.3f}", f"{ratio:.2f}",
                         f"{r['cpu_s_per_image']:.1f}", f"{d['cpu_s_per_image']:.1f}", f"{cratio:.2f}", better(cratio, True)])
        out += ["", f"End to end (text, {e0['steps']} steps euler at cfg 7.5, VAE decode, PIL), {e0['size']}x{e0['size']}, "
                f"{res['e2e_dtype']}; batchsd Pipeline.generate vs diffusers StableDiffusionPipeline on the same chunks; "
                f"medians of {e0['reps']}",
                fmt_table(["batch", "rows", "batchsd img/s", "diffusers img/s", "img/s ratio b/d", "batchsd CPU-s/img",
                           "diffusers CPU-s/img", "CPU ratio b/d", "better (CPU)"], rows)]
        if res.get("parity"):
            out.append(f"same row at batch 1, batchsd vs diffusers image: mean |diff| {res['parity']['mean_abs_pixel_diff']:.2f}/255, "
                       f"max {res['parity']['max_abs_pixel_diff']:.0f}/255")
    if res.get("startup"):
        rows = []
        for key, label in (("to_first_image_s", "disk to first image, s (child's clock)"),
                           ("wall_s", "subprocess wall, s"), ("cpu_s", "CPU, s (whole child)"), ("import_s", "imports, s"),
                           ("load_s", "load, s"), ("first_image_s", "first image, s"),
                           ("peak_rss_load_gib", "peak RSS while loading, GiB"), ("peak_rss_gib", "peak RSS whole run, GiB")):
            vb = bc.median([r[key] for r in res["startup"] if r["side"] == "batchsd"])
            vd = bc.median([r[key] for r in res["startup"] if r["side"] == "diffusers"])
            rows.append([label, f"{vb:.2f}", f"{vd:.2f}", f"{vb / vd:.2f}", better(vb / vd, True)])
        s0 = res["startup"][0]
        out += ["", f"Start-up and memory: a fresh subprocess per side (RSS is per process), {s0['dtype']} from the fp16 file, "
                f"one {s0['size']}x{s0['size']} image, {s0['steps']} steps; file in the page cache; "
                f"medians of {len(res['startup']) // 2} alternating runs",
                fmt_table(["figure", "batchsd", "diffusers", "ratio b/d", "better"], rows)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256x256 only, fewer repeats")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", default="unet,e2e,startup", help="comma list of unet,e2e,startup")
    ap.add_argument("--profile", action="store_true", help="print an op breakdown of one UNet step per side and exit")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child", choices=["batchsd", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--child-dtype", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--child-size", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.child_dtype, args.child_size, args.steps, args.threads)

    torch.set_num_threads(args.threads)
    import diffusers

    only = set(args.only.split(","))
    res = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
               diffusers=diffusers.__version__, threads=args.threads,
               loadavg=" ".join(f"{x:.1f}" for x in os.getloadavg()),
               command="python tests/bench/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               git=bc.git_state())
    path = bc.random_checkpoint()
    res["roof"] = {"fp32": bc.matmul_roof(torch.float32), "bf16": bc.matmul_roof(torch.bfloat16)}
    log(f"roof {res['roof']}")
    layouts = ["contig", "cl"]
    if "startup" in only and not args.profile:   # first, while this process is still small
        res["startup"] = bench_startup("bf16", 256, args.steps, args.threads, reps=1 if args.quick else 2)

    if only & {"unet", "e2e"} or args.profile:
        # fp32 first (UNet figures), then both pipelines cast to bf16 in place (UNet + end to end)
        t0 = time.perf_counter()
        ours = bc.load_batchsd(path, "fp32")
        log(f"batchsd loaded fp32 in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        theirs = bc.load_diffusers(path, torch.float32)
        log(f"diffusers loaded fp32 in {time.perf_counter() - t0:.1f}s")

        def to_bf16():
            for m in (ours.model, theirs.unet, theirs.vae, theirs.text_encoder):
                m.to(torch.bfloat16)
            ours.dtype = torch.bfloat16

        if args.profile:
            print(profile_step(ours, theirs, torch.float32, 256, "contig"))
            print(profile_step(ours, theirs, torch.float32, 256, "cl"))
            to_bf16()
            for lay in layouts:
                print(profile_step(ours, theirs, torch.bfloat16, 256, lay))
            return
        res["unet"] = []
        # (dtype, size, reps, warm-up): 256 first, so that 512 can skip its (costly) warm-up
        fp32_plan = [(256, 2, True)] if args.quick else [(256, 3, True), (512, 2, False)]
        bf16_plan = [(256, 2, True)] if args.quick else [(256, 3, True), (512, 3, False)]
        if "unet" in only:
            for size, reps, warm in fp32_plan:
                res["unet"] += bench_unet(ours, theirs, torch.float32, size, reps, layouts, warm)
        to_bf16()
        if "unet" in only:
            for size, reps, warm in bf16_plan:
                res["unet"] += bench_unet(ours, theirs, torch.bfloat16, size, reps, layouts, warm)
        if "e2e" in only:
            res["e2e_dtype"] = "bf16"
            res["parity"] = parity_check(ours, theirs, 256, args.steps)
            log(f"parity {res['parity']}")
            plan = [(1, 4), (8, 8)] if args.quick else [(1, 4), (2, 4), (8, 8)]
            res["e2e"] = bench_e2e(ours, theirs, 256, args.steps, plan, reps=1)
        del ours, theirs

    res["total_s"] = time.perf_counter() - T_PROCESS
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(report(res) + f"\n\ntotal run time {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
