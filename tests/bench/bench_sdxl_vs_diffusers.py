"""batchsd against diffusers on full-width SDXL base (random weights), side by side.

    python tests/bench/bench_sdxl_vs_diffusers.py                       # bf16 UNet 512 + 1024, start-up
    python tests/bench/bench_sdxl_vs_diffusers.py --only unet --sizes 512 --dtype fp32 --rounds 1
    python tests/bench/bench_sdxl_vs_diffusers.py --only startup --startup-steps 4 --e2e-rows 2

The model: tests/tools/sdxl_full_width_parity.py's random bf16 SDXL base (its `write` stage makes the
sgm single file and the diffusers folder from the same tensors when they are not there yet). Both
sides use the same threads and dtype.

Figures
  1. UNet forward on a CFG pair (batch 2 = one image-step) at each --sizes, in --dtype: batchsd as it
     samples (`Pipeline.unet`: packed convolution weights, channels_last, Winograd under bf16, under
     exact_numerics as in exact mode, the CPU default; --batchsd-exact off: outside it) against
     diffusers' UNet2DConditionModel in --diffusers-layout. One fresh process per side holds one model:
     two full-width models in one process do not fit beside the other jobs of a shared 24 GiB machine
     (bf16: 7 GB each; fp32 14 GB). Each process loads, runs one untimed step at the first size, then
     one timed step at each size; the processes run in ABBA order per round (batchsd, diffusers,
     diffusers, batchsd), so that a machine slowing or speeding up linearly hits both sides alike.
     Seconds are wall and process CPU (all threads; steadier when other jobs load the machine).
  2. Start-up: single file on disk to the first saved PNG (--startup-size, --startup-steps euler, cfg
     7.5), a fresh subprocess per side: batchsd `Pipeline.load` against diffusers'
     `StableDiffusionXLPipeline.from_single_file` (configs from the local folder, no watermarker), sides
     alternating; the file is read once first so both find it in the page cache as far as it fits.
     batchsd runs as `batchsd run` does on the CPU: --low-memory (text encoders and UNet held in turn,
     the later rows' prompts encoded with the first's); --low-memory off holds every part.
  3. Peak RSS (each child's own VmHWM) while loading and over the whole start-up run.
  4. With --e2e-rows N: in the same start-up children, after the first image, N more rows in one
     generate call (Pipeline.generate / the diffusers pipeline with lists of prompts and generators),
     PNGs saved: images/s, CPU seconds per image, peak RSS.

The header prints the CPU (ISA, AMX or not: bf16 is only fast with AMX), threads and the load average;
every timing line the load average at that minute. Method and results: docs/performance.md, "SDXL".
"""
from __future__ import annotations

import argparse
import json
import os
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
from bench_vs_diffusers import better, fmt_table, log, set_layout, startup_table  # noqa: E402

sys.path.insert(0, str(bc.REPO / "tests" / "tools"))
from sdxl_full_width_parity import DEFAULT_DIR, FILE_NAME, FOLDER_NAME, wait_for_memory  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse, detailed, 8k"
# what a child holds at its peak, GiB (bf16; fp32 twice): a child starts when the machine has it free
CHILD_NEEDS_GIB = {"unet": 9, "startup": 11}
WINOGRAD = {"auto": None, "on": True, "off": False}   # --winograd: Pipeline.load's winograd argument
ATTENTION = {"auto": None, "fused": True, "torch": False}   # --attention: Pipeline.load's fused_attention


def model_paths() -> tuple[Path, Path]:
    """(single file, diffusers folder) of the random SDXL base, written once by the parity script."""
    path, folder = DEFAULT_DIR / FILE_NAME, DEFAULT_DIR / FOLDER_NAME
    if not (path.is_file() and (folder / "model_index.json").is_file()):
        import subprocess

        subprocess.run([sys.executable, str(bc.REPO / "tests" / "tools" / "sdxl_full_width_parity.py"), "--stage",
                        "write"], check=True)
    return path, folder


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def sdxl_unet_tflop(size: int) -> float:
    """TFLOP (2 x MACs) of one SDXL UNet forward on a CFG pair at size x size, counted on the meta
    device with the direct computation (upsample as interpolate + 3x3 conv): batchsd's folded upsamples
    and Winograd convolutions do fewer, so its TFLOP/s is an effective rate."""
    from torch.utils.flop_counter import FlopCounterMode

    from batchsd.model.config import SDXL
    from batchsd.model.fast.upsample import NearestUpsampleConv
    from batchsd.model.unet import UNetModel

    with torch.device("meta"), bc._unfolded(NearestUpsampleConv):
        unet = UNetModel(SDXL.unet)
        with FlopCounterMode(display=False) as counter:
            unet(torch.zeros(2, 4, size // 8, size // 8), torch.zeros(2), torch.zeros(2, 77, 2048),
                 torch.zeros(2, 2816))
    return counter.get_total_flops() / 1e12


# ---------------------------------------------------------------- 1. UNet step, one side per process
@torch.inference_mode()
def unet_child(side: str, dtype_name: str, sizes: list[int], threads: int, layout: str, exact: str,
               winograd: str = "auto", attention: str = "auto") -> None:
    """Load one side's UNet, one untimed step at sizes[0], then one timed step at each size: prints
    CHILD {"steps": [{size, wall_s, cpu_s}], load_s, peak_rss_gib}. batchsd's steps run under
    exact_numerics as Pipeline.generate runs them (exact mode, the CPU default) unless exact is "off"."""
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    path, folder = model_paths()
    t0 = time.perf_counter()
    if side == "batchsd":
        from batchsd.model.fast.allocator import tune_cpu_allocator

        tune_cpu_allocator()
        from batchsd.model.fast.exact import exact_numerics

        pipe = bc.load_batchsd(path, dtype_name, winograd=WINOGRAD[winograd], fused_attention=ATTENTION[attention])
        memory_format = pipe.memory_format
        log(f"batchsd: Winograd {pipe.winograd}, fused attention {pipe.fused_attention}")

        def step(x, t, ctx, y):
            with exact_numerics(pipe.exact and exact == "shipped", torch.device("cpu")):
                return pipe.unet(x, t, ctx, y)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).eval()
        set_layout(unet, layout)
        memory_format = torch.channels_last if layout == "cl" else torch.contiguous_format

        def step(x, t, ctx, y):   # y = [pooled text 1280 | time_ids' embeddings]: diffusers takes the ids
            return unet(x, t, encoder_hidden_states=ctx, return_dict=False,
                        added_cond_kwargs={"text_embeds": y[:, :1280], "time_ids": time_ids})
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2).to(dtype)
    ctx = torch.randn(2, 77, 2048, generator=g).to(dtype)
    y = torch.randn(2, 2816, generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0])

    def inputs(size):
        return torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype).contiguous(memory_format=memory_format)

    x = inputs(sizes[0])
    step(x, t, ctx, y)                                     # warm-up: not timed
    steps = []
    for size in sizes:
        x = inputs(size)
        wall, cpu = bc.timed2(lambda: step(x, t, ctx, y))
        steps.append(dict(size=size, wall_s=wall, cpu_s=cpu, loadavg=loadavg()))
    print("CHILD " + json.dumps(dict(side=side, steps=steps, load_s=load_s, peak_rss_gib=bc.peak_rss_gib(own=True))))


def bench_unet(dtype_name: str, sizes: list[int], rounds: int, threads: int, layout: str, exact: str,
               winograd: str = "auto", attention: str = "auto") -> list[dict]:
    out = []
    for rnd in range(rounds):
        for side in ("batchsd", "diffusers", "diffusers", "batchsd"):
            wait_for_memory(CHILD_NEEDS_GIB["unet"] * (2 if dtype_name == "fp32" else 1), "UNet child")
            rec = bc.run_child(__file__, "--child", "unet", "--side", side, "--dtype", dtype_name, "--sizes",
                               ",".join(map(str, sizes)), "--threads", str(threads), "--diffusers-layout", layout, "--batchsd-exact", exact,
                               "--winograd", winograd, "--attention", attention,
                               what=f"{side} UNet child")
            for s in rec["steps"]:
                out.append(dict(s, side=side, dtype=dtype_name, round=rnd))
                log(f"unet {dtype_name} {s['size']} {side}: {s['wall_s']:.1f} s wall, {s['cpu_s']:.1f} s CPU "
                    f"(load average {s['loadavg']}); child peak RSS {rec['peak_rss_gib']:.2f} GiB")
    return out


# ---------------------------------------------------------------- 2-3. start-up and RSS
def startup_child(side: str, dtype_name: str, size: int, steps: int, threads: int, e2e_rows: int,
                  low_memory: bool = False) -> None:
    """One fresh process: load from the single file, make one image, save it as PNG; then (e2e_rows)
    that many more rows in one generate call, timed, saved as PNGs; CHILD json. `low_memory`: batchsd
    loads with --low-memory and, as a job does (Worker.encode_ahead), encodes the later rows' prompts
    with the first's."""
    torch.set_num_threads(threads)
    t_import = time.perf_counter() - T_PROCESS
    path, folder = model_paths()
    t0 = time.perf_counter()
    if side == "batchsd":
        from batchsd import GenerationRow
        from batchsd.model.fast.allocator import tune_cpu_allocator

        tune_cpu_allocator()
        pipe = bc.load_batchsd(path, dtype_name, low_memory=low_memory)
        load_s, rss_load = time.perf_counter() - t0, bc.peak_rss_gib(own=True)

        def rows(n: int, seed: int) -> list:
            return [GenerationRow(f"{PROMPT}, {i}", seed=seed + i, steps=steps, cfg_scale=7.5, sampler="euler",
                                  width=size, height=size) for i in range(n)]

        def generate(n: int, seed: int) -> list:
            if low_memory and seed == 1:
                pipe.encode_ahead(iter(rows(1, 1) + rows(e2e_rows, 100)), now=1)
            return pipe.generate(rows(n, seed)).images
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), torch_dtype=DTYPES[dtype_name],
                                                          local_files_only=True, add_watermarker=False)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        load_s, rss_load = time.perf_counter() - t0, bc.peak_rss_gib(own=True)

        def generate(n: int, seed: int) -> list:
            return pipe(prompt=[f"{PROMPT}, {i}" for i in range(n)], negative_prompt=[""] * n,
                        num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
                        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]).images
    with tempfile.TemporaryDirectory() as tmp:
        with torch.inference_mode():
            generate(1, 1)[0].save(Path(tmp) / "first.png")
        total = time.perf_counter() - T_PROCESS
        cpu_first, rss_first = time.process_time(), bc.peak_rss_gib(own=True)
        e2e = {}
        if e2e_rows:
            def rows_to_png():
                with torch.inference_mode():
                    for i, image in enumerate(generate(e2e_rows, 100)):
                        image.save(Path(tmp) / f"row{i}.png")
            wall, cpu = bc.timed2(rows_to_png)
            e2e = dict(e2e_rows=e2e_rows, e2e_wall_s=wall, e2e_cpu_s=cpu, e2e_loadavg=loadavg(),
                       e2e_peak_rss_gib=bc.peak_rss_gib(own=True))
    print("CHILD " + json.dumps(dict(side=side, import_s=t_import, load_s=load_s, first_image_s=total - t_import - load_s,
                                     to_first_image_s=total, peak_rss_load_gib=rss_load,
                                     peak_rss_gib=rss_first, cpu_s=cpu_first,
                                     loadavg=loadavg(), **e2e)))


def bench_startup(dtype_name: str, size: int, steps: int, threads: int, reps: int, e2e_rows: int,
                  low_memory: bool = False) -> list[dict]:
    path, _ = model_paths()
    with open(path, "rb") as f:             # into the page cache, as far as it fits, for both sides
        while f.read(1 << 26):
            pass
    out = []
    for rep in range(reps):
        for side in ("batchsd", "diffusers")[::1 if rep % 2 == 0 else -1]:
            wait_for_memory(CHILD_NEEDS_GIB["startup"] * (2 if dtype_name == "fp32" else 1), "start-up child")
            t0 = time.perf_counter()
            rec = bc.run_child(__file__, "--child", "startup", "--side", side, "--dtype", dtype_name, "--startup-size",
                               str(size), "--startup-steps", str(steps), "--threads", str(threads),
                               "--e2e-rows", str(e2e_rows), "--low-memory", "on" if low_memory else "off",
                               what=f"{side} start-up child")
            rec.update(wall_s=time.perf_counter() - t0, rep=rep, dtype=dtype_name, size=size, steps=steps)
            out.append(rec)
            log(f"startup {side} rep {rep}: wall {rec['wall_s']:.1f}s (load {rec['load_s']:.1f}s), peak RSS "
                f"{rec['peak_rss_gib']:.2f} GiB (load {rec['peak_rss_load_gib']:.2f}), load average {rec['loadavg']}")
    return out


# ---------------------------------------------------------------- report
def report(res: dict) -> str:
    out = [f"date {res['date']}, torch {res['torch']}, diffusers {res['diffusers']}, threads {res['threads']}, "
           f"load average at start {res['loadavg']}, at end {res.get('loadavg_end', '?')}, code {res['git']}, "
           f"command `{res['command']}`",
           f"{res['cpu']}; AMX (torch.cpu._is_amx_tile_supported()): {res['amx']}",
           f"matmul roof (torch.mm 4096^2, best of 3): fp32 {res['roof']['fp32']:.3f} TFLOP/s, "
           f"bf16 {res['roof']['bf16']:.3f} TFLOP/s"]
    if res.get("unet"):
        rows = []
        for dt in sorted({r["dtype"] for r in res["unet"]}):
            for size in sorted({r["size"] for r in res["unet"] if r["dtype"] == dt}):
                mine = [r for r in res["unet"] if r["dtype"] == dt and r["size"] == size]
                b = [r for r in mine if r["side"] == "batchsd"]
                d = [r for r in mine if r["side"] == "diffusers"]
                bw, dw = bc.median([r["wall_s"] for r in b]), bc.median([r["wall_s"] for r in d])
                bcpu, dcpu = bc.median([r["cpu_s"] for r in b]), bc.median([r["cpu_s"] for r in d])
                flop = res["tflop"][str(size)]
                rows.append([size, dt, f"{bw:.1f} / {bcpu:.1f}", f"{dw:.1f} / {dcpu:.1f}",
                             f"{dw / bw:.2f}x", f"{dcpu / bcpu:.2f}x", better(bcpu / dcpu, True),
                             f"{flop / min(r['wall_s'] for r in b):.3f}", f"{flop / min(r['wall_s'] for r in d):.3f}",
                             ", ".join(f"{r['side'][0]} {r['wall_s']:.0f}" for r in mine), len(b)])
        out += ["", f"UNet forward on a CFG pair (batch 2) = one image-step; batchsd as it samples (exact_numerics: "
                f"{res.get('batchsd_exact', 'off')}, --winograd {res.get('winograd', 'auto')}, --attention "
                f"{res.get('attention', 'auto')}), diffusers "
                f"{res['diffusers_layout']}; one process per side, ABBA per round, medians of each side's timed "
                f"steps. Seconds: wall / process CPU. Speed-up = diffusers / batchsd (above 1: batchsd faster). "
                f"TFLOP/s from the min wall and the counted FLOPs "
                f"({', '.join(f'{s}: {t:.2f} TFLOP' for s, t in sorted(res['tflop'].items(), key=lambda kv: int(kv[0])))}).",
                fmt_table(["size", "dtype", "batchsd s (wall / CPU)", "diffusers s (wall / CPU)", "speed-up (wall)",
                           "speed-up (CPU)", "better (CPU)", "batchsd TFLOP/s", "diffusers TFLOP/s",
                           "each step in run order, wall s", "steps per side"], rows)]
    startup = res.get("startup", [])
    if startup:
        s0 = startup[0]
        out += ["", f"Start-up and memory: a fresh subprocess per side (batchsd --low-memory: {res.get('low_memory')}), "
                f"{s0['dtype']} from the bf16 single file "
                f"(diffusers: from_single_file), one {s0['size']}x{s0['size']} image, {s0['steps']} steps euler, saved as "
                f"PNG; medians of {len(startup) // 2} runs per side, sides alternating; load averages "
                f"{', '.join(r['loadavg'].split()[0] for r in startup)}",
                startup_table(startup)]
    e2e = [r for r in startup if r.get("e2e_rows")]
    if e2e:
        rows = []
        for key, label, per_image in (("e2e_wall_s", "images/s (wall)", False), ("e2e_cpu_s", "CPU s per image", True),
                                      ("e2e_peak_rss_gib", "peak RSS, GiB", None)):
            vb = bc.median([r[key] for r in e2e if r["side"] == "batchsd"])
            vd = bc.median([r[key] for r in e2e if r["side"] == "diffusers"])
            n = e2e[0]["e2e_rows"]
            if per_image is False:
                vb, vd = n / vb, n / vd
            elif per_image:
                vb, vd = vb / n, vd / n
            rows.append([label, f"{vb:.3f}", f"{vd:.3f}", f"{vb / vd:.2f}", better(vb / vd, per_image is not False)])
        out += ["", f"Generation after the first image, in the same children: {e2e[0]['e2e_rows']} rows in one call "
                f"(Pipeline.generate / the diffusers pipeline with a list of prompts and generators), "
                f"{e2e[0]['size']}x{e2e[0]['size']}, {e2e[0]['steps']} steps euler, cfg 7.5, PNGs saved; load averages "
                f"{', '.join(r['e2e_loadavg'].split()[0] for r in e2e)}",
                fmt_table(["figure", "batchsd", "diffusers", "ratio b/d", "better"], rows)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="unet,startup", help="comma list of unet,startup")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of every figure (default bf16)")
    ap.add_argument("--sizes", default="512,1024", help="UNet step sizes")
    ap.add_argument("--rounds", type=int, default=1, help="ABBA rounds of the UNet children (2 timed steps per side each)")
    ap.add_argument("--diffusers-layout", choices=["contig", "cl"], default="contig")
    ap.add_argument("--batchsd-exact", choices=["shipped", "off"], default="shipped",
                    help="batchsd's UNet step under exact_numerics as Pipeline.generate runs it (shipped: exact mode "
                         "is the CPU default), or outside it (off)")
    ap.add_argument("--winograd", choices=list(WINOGRAD), default="auto",
                    help="batchsd's Winograd rule for the UNet figure (auto: devices.default_winograd)")
    ap.add_argument("--attention", choices=list(ATTENTION), default="auto",
                    help="batchsd's attention for the UNet figure (auto: devices.default_attention)")
    ap.add_argument("--startup-size", type=int, default=512)
    ap.add_argument("--startup-steps", type=int, default=2)
    ap.add_argument("--startup-reps", type=int, default=1, help="start-up runs per side (alternating)")
    ap.add_argument("--e2e-rows", type=int, default=0,
                    help="after its first image, each start-up child makes this many more rows in one call, timed")
    ap.add_argument("--low-memory", choices=["on", "off"], default="on",
                    help="start-up: batchsd with --low-memory (text encoders and UNet never held together; "
                         "`batchsd run`'s default on the CPU) or --no-low-memory")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child", choices=["unet", "startup"], help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=["batchsd", "diffusers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child == "unet":
        return unet_child(args.side, args.dtype, sizes, args.threads, args.diffusers_layout, args.batchsd_exact,
                          args.winograd, args.attention)
    if args.child == "startup":
        return startup_child(args.side, args.dtype, args.startup_size, args.startup_steps, args.threads, args.e2e_rows,
                             args.low_memory == "on")

    import diffusers

    torch.set_num_threads(args.threads)
    res = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
               diffusers=diffusers.__version__, threads=args.threads, cpu=bc.cpu_description(),
               amx=bool(torch.cpu._is_amx_tile_supported()), loadavg=loadavg(), git=bc.git_state(),
               command="python tests/bench/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               diffusers_layout=args.diffusers_layout, batchsd_exact=args.batchsd_exact, winograd=args.winograd,
               attention=args.attention, low_memory=args.low_memory)
    model_paths()
    res["roof"] = {"fp32": bc.matmul_roof(torch.float32), "bf16": bc.matmul_roof(torch.bfloat16)}
    log(f"{res['cpu']}, load average {res['loadavg']}, roof {res['roof']}")
    only = set(args.only.split(","))
    if "startup" in only:
        res["startup"] = bench_startup(args.dtype, args.startup_size, args.startup_steps, args.threads, args.startup_reps,
                                       args.e2e_rows, args.low_memory == "on")
    if "unet" in only:
        res["tflop"] = {str(s): sdxl_unet_tflop(s) for s in sizes}
        res["unet"] = bench_unet(args.dtype, sizes, args.rounds, args.threads, args.diffusers_layout, args.batchsd_exact,
                                 args.winograd, args.attention)
    res["loadavg_end"] = loadavg()
    res["total_s"] = time.perf_counter() - T_PROCESS
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(report(res) + f"\n\ntotal run time {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
